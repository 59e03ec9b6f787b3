"""``--output`` values read as buildx reads them (``ParseExports``), and refused
where an option would do nothing: each expectation is written from buildx's
rules or from what our exporters honour, not from the parser's output."""

from __future__ import annotations

import pytest

from ociworker.core.outputs import (
    OutputSpec,
    check_outputs,
    parse_annotations,
    parse_labels,
    with_push,
)
from ociworker.errors import ConfigError


def _spec(typ: str, **attrs: str) -> OutputSpec:
    return OutputSpec(typ, tuple(sorted((k.replace("_", "-"), v) for k, v in attrs.items())))


@pytest.mark.parametrize(
    ("text", "want"),
    [
        # buildx: one field that is no key=value is a directory; "-" a tar on stdout
        ("out", _spec("local", dest="out")),
        ("/abs/out dir", _spec("local", dest="/abs/out dir")),
        ("-", _spec("tar", dest="-")),
        ("type=oci,dest=x.tar", _spec("oci", dest="x.tar")),
        # keys are case-insensitive and trimmed, values kept as written
        (" TYPE=docker, Dest=x.tar", _spec("docker", dest="x.tar")),
        # CSV quoting, as buildx: a comma inside a value
        ('type=local,"dest=a,b"', _spec("local", dest="a,b")),
        # buildx: type=oci and type=tar without dest go to stdout
        ("type=oci", _spec("oci", dest="-")),
        ("type=tar", _spec("tar", dest="-")),
        ("type=image", _spec("image")),
        (
            "type=image,name=r.example/a:1,push=false",
            _spec("image", name="r.example/a:1", push="false"),
        ),
        (
            "type=oci,dest=o.tar,compression=zstd,compression-level=3,oci-mediatypes=true",
            _spec(
                "oci",
                dest="o.tar",
                compression="zstd",
                compression_level="3",
                oci_mediatypes="true",
            ),
        ),
        (
            "type=layers,dest=l,compression=uncompressed",
            _spec("layers", dest="l", compression="uncompressed"),
        ),
    ],
)
def test_accepted_outputs(text: str, want: OutputSpec) -> None:
    assert OutputSpec.parse(text) == want


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", 'invalid output ""'),
        # a key=value without type: buildx's "type is required for output"
        ("dest=x.tar", "type is required for output 'dest=x.tar'"),
        ("typ=oci,dest=x.tar", "type is required for output 'typ=oci,dest=x.tar'"),
        ("type=oci,dest", "'dest' is not KEY=VALUE"),
        ("type=oci,=x", "'=x' is not KEY=VALUE"),
        ("type=oci,dest=", "'type=oci,dest=': dest is empty"),
        ("type=image,name=", "name is empty"),
        ("type=oci,type=docker,dest=x", "type is given twice"),
        ("type=oci,dest=a,DEST=b", "dest is given twice"),
        ("type=nope", "unknown output type 'nope'"),
        # unknown attributes per type: only what the exporter honours
        ("type=oci,dest=x,tar=false", "unknown attribute 'tar' for type=oci"),
        ("type=image,dest=x", "unknown attribute 'dest' for type=image"),
        ("type=local,dest=x,compression=zstd", "unknown attribute 'compression' for type=local"),
        ("type=tar,dest=x,name=a", "unknown attribute 'name' for type=tar"),
        ("type=layers,dest=x,name=a", "unknown attribute 'name' for type=layers"),
        ("type=oci,dest=x,push=true", "unknown attribute 'push' for type=oci"),
        ("type=image,unpack=true", "unknown attribute 'unpack'"),
        # values we cannot honour
        ("type=oci,dest=x,compression=lz4", "unknown compression 'lz4'"),
        ("type=oci,dest=x,oci-mediatypes=yes", "oci-mediatypes must be true or false"),
        ("type=image,push=maybe", "push must be true or false"),
        # dests
        ("type=local", "needs dest=PATH"),
        ("type=layers", "needs dest=PATH"),
        ("type=docker", "type=docker needs dest=FILE"),
        ("type=local,dest=-", "use type=tar,dest=-"),
        ("type=layers,dest=-", "cannot be written to stdout"),
    ],
)
def test_refused_outputs_name_the_culprit(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        OutputSpec.parse(text)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        # BuildKit: type=registry is image,push=true; both push
        ("type=image,push=true", _spec("image", push="true")),
        ("type=image,name=a/b,push=true", _spec("image", name="a/b", push="true")),
        ("type=registry", _spec("registry")),
        ("type=registry,name=r.example/a:1", _spec("registry", name="r.example/a:1")),
        (
            "type=registry,name=r/a,compression=zstd,force-compression=true,oci-mediatypes=true",
            _spec(
                "registry",
                name="r/a",
                compression="zstd",
                force_compression="true",
                oci_mediatypes="true",
            ),
        ),
    ],
)
def test_pushing_outputs_are_read(text: str, want: OutputSpec) -> None:
    got = OutputSpec.parse(text)
    assert got == want
    assert got.pushes


@pytest.mark.parametrize(
    "text", ["type=image", "type=image,push=false", "type=oci,dest=o.tar", "type=local,dest=d"]
)
def test_outputs_that_do_not_push(text: str) -> None:
    assert not OutputSpec.parse(text).pushes


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("type=image,push=yes", "push must be true or false"),
        ("type=registry,force-compression=1", "force-compression must be true or false"),
        ("type=registry,dest=x", "unknown attribute 'dest' for type=registry"),
        ("type=local,dest=d,push=true", "unknown attribute 'push' for type=local"),
        ("type=oci,dest=o.tar,push=true", "unknown attribute 'push' for type=oci"),
    ],
)
def test_bad_push_options_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        OutputSpec.parse(text)
    assert message in str(exc.value)


@pytest.mark.parametrize("text", ["type=registry", "type=image,push=true"])
def test_a_push_needs_a_name_or_a_tag(text: str) -> None:
    out = OutputSpec.parse(text)
    with pytest.raises(ConfigError, match="tag is needed when pushing to registry"):
        check_outputs([out])
    check_outputs([out], tags=["r.example/a:1"])  # -t names it
    named = OutputSpec(out.type, tuple(sorted((*out.attrs, ("name", "r.example/a:1")))))
    check_outputs([named])


def test_push_flag_is_buildx_shorthand() -> None:
    # buildx: --push alone is an image output that pushes ...
    assert with_push(()) == (_spec("image", push="true"),)
    # ... and sets push=true on an image output given with it
    got = with_push((OutputSpec.parse("type=image,name=r/a:1"),))
    assert got == (_spec("image", name="r/a:1", push="true"),)
    assert with_push((_spec("registry"),)) == (_spec("registry"),)
    with pytest.raises(ConfigError, match='push and "oci" output can\'t be used together'):
        with_push((OutputSpec.parse("type=oci,dest=o.tar"),))


def test_annotations_as_buildx_spells_them() -> None:
    got = parse_annotations(
        ["org.opencontainers.image.title=demo", "manifest:com.example.k=a=b", "empty="]
    )
    assert got == {
        "org.opencontainers.image.title": "demo",
        "com.example.k": "a=b",  # the value may hold '='
        "empty": "",
    }
    # a key that only looks like a type prefix is a key
    assert parse_annotations(["com.example:x=1"]) == {"com.example:x": "1"}


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("novalue", "want [manifest:]KEY=VALUE"),
        ("=v", "want [manifest:]KEY=VALUE"),
        ("index:k=v", "only manifest annotations are supported"),
        ("manifest-descriptor:k=v", "only manifest annotations are supported"),
        ("manifest[linux/amd64]:k=v", "only manifest annotations are supported"),
    ],
)
def test_bad_annotations_are_refused(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_annotations([item])


def test_labels_as_docker_reads_them() -> None:
    assert parse_labels(["a=1", "b", "c=x=y"]) == {"a": "1", "b": "", "c": "x=y"}
    with pytest.raises(ConfigError, match="invalid --label"):
        parse_labels(["=1"])


def test_specs_made_in_code_are_held_to_the_same_rules() -> None:
    # a Python caller or a daemon's client may skip parse(); the controller
    # runs check_outputs for them
    with pytest.raises(ConfigError, match="unknown attribute 'tar'"):
        check_outputs([_spec("oci", dest="x", tar="false")])
    with pytest.raises(ConfigError, match="pushing"):
        check_outputs([_spec("image", push="true")])
    with pytest.raises(ConfigError, match="needs dest"):
        check_outputs([_spec("oci")])


def test_two_outputs_on_stdout_or_one_dest_conflict() -> None:
    with pytest.raises(ConfigError, match=r"only one output can be written to stdout"):
        check_outputs([OutputSpec.parse("-"), OutputSpec.parse("type=oci,dest=-")])
    with pytest.raises(ConfigError, match=r"both write to a/x\.tar") as exc:
        check_outputs(
            [
                OutputSpec.parse("type=oci,dest=x.tar/../a/x.tar"),
                OutputSpec.parse("type=docker,dest=a/x.tar"),
            ]
        )
    assert "type=oci" in str(exc.value) and "type=docker" in str(exc.value)
    with pytest.raises(ConfigError, match="both write to"):
        check_outputs([OutputSpec.parse("out"), OutputSpec.parse("type=layers,dest=./out")])
    # different dests, and outputs without one, are fine
    check_outputs(
        [
            OutputSpec.parse("type=oci,dest=a.tar"),
            OutputSpec.parse("type=docker,dest=b.tar"),
            OutputSpec.parse("-"),
            OutputSpec.parse("type=image"),
            OutputSpec.parse("type=image,name=x/y"),
        ]
    )


def test_a_spec_renders_as_an_output_value() -> None:
    spec = OutputSpec.parse("type=oci,compression=zstd,dest=o.tar")
    assert str(spec) == "type=oci,compression=zstd,dest=o.tar"
    assert OutputSpec.parse(str(spec)) == spec
