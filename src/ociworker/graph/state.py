"""The graph API's values: ``State`` (a filesystem plus an image config, as
BuildKit's ``llb.State``) and the mounts a ``run`` takes.

Every value is frozen: a method returns a new ``State`` and leaves its own
alone, so one state can be the base of many (a build matrix, fan-out stages).
A state only describes; ``ociworker.graph.lower`` turns it into the worker's
vertices once its base images are resolved (their config decides the steps'
environment, as it does for a Dockerfile's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ociworker.core.gitref import redact
from ociworker.errors import UserError

#: ``run(network=...)``: what ``RUN --network`` takes
NETWORKS = ("default", "none", "host")


# --- mounts of run() ---------------------------------------------------------


@dataclass(frozen=True)
class CacheMount:
    """``RUN --mount=type=cache``: a directory kept between builds (by ``id``)."""

    target: str
    id: str = ""
    sharing: str = "shared"
    mode: int | str | None = None
    uid: int | None = None
    gid: int | None = None
    readonly: bool = False
    #: seeds a new cache with this state's files (``from=``), at ``source``
    from_state: State | None = None
    source: str = "/"


@dataclass(frozen=True)
class SecretMount:
    """``RUN --mount=type=secret``: the build's secret ``id`` as a file (default
    ``/run/secrets/ID``) or, with ``env``, an environment variable. Only the id
    is in the step's key, never the value."""

    id: str
    target: str = ""
    env: str = ""
    required: bool = False
    mode: int | str = "0400"
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True)
class SSHMount:
    """``RUN --mount=type=ssh``: the build's ssh agent ``id`` as a socket."""

    id: str = "default"
    target: str = ""
    required: bool = False
    mode: int | str = "0600"
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True)
class TmpfsMount:
    """``RUN --mount=type=tmpfs``: an empty in-memory filesystem."""

    target: str
    size: str = ""


@dataclass(frozen=True)
class BindMount:
    """``RUN --mount=type=bind``: ``source`` of another state at ``target``."""

    state: State
    target: str
    source: str = "/"
    readonly: bool = True


Mount = CacheMount | SecretMount | SSHMount | TmpfsMount | BindMount


def cache(
    target: str,
    *,
    id: str = "",
    sharing: str = "shared",
    mode: int | str | None = None,
    uid: int | None = None,
    gid: int | None = None,
    readonly: bool = False,
    from_state: State | None = None,
    source: str = "/",
) -> CacheMount:
    """A cache mount at ``target`` (``id`` defaults to the target, as BuildKit's)."""
    if sharing not in ("shared", "private", "locked"):
        raise UserError(f"cache mount: invalid sharing {sharing!r} (shared, private or locked)")
    return CacheMount(target, id, sharing, mode, uid, gid, readonly, from_state, source)


def secret(
    id: str,
    *,
    target: str = "",
    env: str = "",
    required: bool = False,
    mode: int | str = "0400",
    uid: int | None = None,
    gid: int | None = None,
) -> SecretMount:
    """A secret mount of the build's secret ``id``."""
    if not id:
        raise UserError("secret mount: id is required")
    return SecretMount(id, target, env, required, mode, uid, gid)


def ssh(
    id: str = "default",
    *,
    target: str = "",
    required: bool = False,
    mode: int | str = "0600",
    uid: int | None = None,
    gid: int | None = None,
) -> SSHMount:
    """An ssh agent mount (default: ``/run/buildkit/ssh_agent.N``)."""
    return SSHMount(id or "default", target, required, mode, uid, gid)


def tmpfs(target: str, *, size: str = "") -> TmpfsMount:
    """A tmpfs mount at ``target`` (``size`` as ``64m``)."""
    return TmpfsMount(target, size)


def bind(state: State, target: str, *, source: str = "/", readonly: bool = True) -> BindMount:
    """``source`` of ``state`` mounted at ``target`` (read-only unless told)."""
    return BindMount(state, target, source, readonly)


# --- the nodes a state is made of ---------------------------------------------


@dataclass(frozen=True)
class ImageNode:
    ref: str
    platform: str = ""


@dataclass(frozen=True)
class ScratchNode:
    pass


@dataclass(frozen=True)
class LocalNode:
    name: str
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class GitNode:
    url: str
    keep_git_dir: bool = False


@dataclass(frozen=True)
class HttpNode:
    url: str
    checksum: str = ""
    filename: str = ""


@dataclass(frozen=True)
class RunNode:
    parent: State
    args: tuple[str, ...]
    shell: bool
    env: tuple[tuple[str, str], ...]
    cwd: str | None
    user: str | None
    network: str
    mounts: tuple[Mount, ...]
    security: str


@dataclass(frozen=True)
class CopyNode:
    parent: State
    source: State
    srcs: tuple[str, ...]
    dest: str
    chown: str = ""
    chmod: int | str | None = None
    exclude: tuple[str, ...] = ()
    parents: bool = False


@dataclass(frozen=True)
class MkdirNode:
    parent: State
    path: str
    mode: int
    make_parents: bool
    chown: str


@dataclass(frozen=True)
class MkfileNode:
    parent: State
    path: str
    data: str
    mode: int
    chown: str


@dataclass(frozen=True)
class RmNode:
    parent: State
    path: str
    allow_not_found: bool
    allow_wildcard: bool


@dataclass(frozen=True)
class ConfigNode:
    """An image config change: ``kind`` is the Dockerfile instruction it mirrors
    (ENV, WORKDIR, USER, ENTRYPOINT, CMD, LABEL), ``value`` its argument."""

    parent: State
    kind: str
    #: ENV, LABEL, ARG: the pairs; CMD, ENTRYPOINT: argv (one string with ``shell``);
    #: WORKDIR, USER: ``text``
    pairs: tuple[tuple[str, str], ...] = ()
    argv: tuple[str, ...] = ()
    text: str = ""
    shell: bool = False


@dataclass(frozen=True)
class MergeNode:
    inputs: tuple[State, ...]


@dataclass(frozen=True)
class DiffNode:
    lower: State
    upper: State


Node = (
    ImageNode
    | ScratchNode
    | LocalNode
    | GitNode
    | HttpNode
    | RunNode
    | CopyNode
    | MkdirNode
    | MkfileNode
    | RmNode
    | ConfigNode
    | MergeNode
    | DiffNode
)


# --- State --------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class State:
    """A filesystem and its image config, built step by step. Each method
    returns a new state; the steps run only when the state is built."""

    node: Node = field(default_factory=ScratchNode)

    def __repr__(self) -> str:
        # One line: the default repr would print the whole chain below (and an
        # error message naming a mount would recurse through every state).
        n = self.node
        if isinstance(n, ImageNode):
            return f"State(image {n.ref!r})"
        if isinstance(n, LocalNode | GitNode | HttpNode):
            what = n.name if isinstance(n, LocalNode) else redact(n.url)
            return f"State({type(n).__name__.removesuffix('Node').lower()} {what!r})"
        if isinstance(n, RunNode):
            return f"State(run {' '.join(n.args)!r})"
        return f"State({type(n).__name__.removesuffix('Node').lower()})"

    # -- steps that make a layer -------------------------------------------------

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        network: str = "default",
        mounts: Sequence[Mount] = (),
        security: str = "sandbox",
    ) -> State:
        """Run ``cmd`` (a string: through the image's shell, ``RUN cmd``; a list:
        as argv, ``RUN ["a", "b"]``) on this filesystem. ``env`` is added to the
        config's environment for this step only (as a Dockerfile ``ARG``),
        ``cwd``/``user`` override the config's for this step only. Its history
        entry is ``RUN argv``: unlike a Dockerfile's, it lists no ARGs
        (``|N NAME=value``), which only the image's history would show."""
        if isinstance(cmd, str):
            args: tuple[str, ...] = (cmd,)
            shell = True
        else:
            args = tuple(cmd)
            shell = False
        if not args or not args[0]:
            raise UserError("run: a command is required")
        if network not in NETWORKS:
            raise UserError(f"run: unsupported network {network!r}: use default, none or host")
        if security not in ("sandbox", "insecure"):
            raise UserError(f"run: invalid security {security!r}: use sandbox or insecure")
        for m in mounts:
            if not isinstance(m, CacheMount | SecretMount | SSHMount | TmpfsMount | BindMount):
                raise UserError(f"run: {m!r} is no mount (use cache(), secret(), ssh(), ...)")
        pairs = tuple((str(k), str(v)) for k, v in (env or {}).items())
        for k, _ in pairs:
            if not k or "=" in k:
                raise UserError(f"run: invalid environment variable name {k!r}")
        node = RunNode(self, args, shell, pairs, cwd, user, network, tuple(mounts), security)
        return State(node)

    def copy(
        self,
        source: State,
        src: str | Sequence[str],
        dest: str,
        *,
        chown: str = "",
        chmod: int | str | None = None,
        exclude: Sequence[str] = (),
        parents: bool = False,
    ) -> State:
        """``COPY --from=source src... dest``: ``src`` paths (or wildcards) of
        ``source`` into ``dest`` (relative to the config's working dir; a
        trailing ``/`` makes it a directory)."""
        srcs = (src,) if isinstance(src, str) else tuple(src)
        if not srcs or not all(srcs):
            raise UserError("copy: at least one source path is required")
        for path in (*srcs, dest):
            _inside(path, "copy")
        if not isinstance(source, State):
            raise UserError(f"copy: the source must be a State, not {type(source).__name__}")
        return State(CopyNode(self, source, srcs, dest, chown, chmod, tuple(exclude), parents))

    def mkdir(
        self, path: str, mode: int = 0o755, *, parents: bool = True, chown: str = ""
    ) -> State:
        """Create directory ``path`` (its parents too, unless ``parents=False``)."""
        return State(MkdirNode(self, _path(path, "mkdir"), mode, parents, chown))

    def mkfile(self, path: str, data: str | bytes, mode: int = 0o644, *, chown: str = "") -> State:
        """Write a file of ``data`` (text, stored as UTF-8) at ``path``."""
        text = data.decode() if isinstance(data, bytes) else data
        return State(MkfileNode(self, _path(path, "mkfile"), text, mode, chown))

    def rm(self, path: str, *, allow_not_found: bool = True, allow_wildcard: bool = False) -> State:
        """Remove ``path`` (a missing one is fine unless ``allow_not_found=False``)."""
        return State(RmNode(self, _path(path, "rm"), allow_not_found, allow_wildcard))

    # -- image config ------------------------------------------------------------------

    def with_env(self, name: str | Mapping[str, str], value: str = "") -> State:
        """``ENV name=value`` (or ``ENV`` of each pair of a mapping, in one entry):
        in the image config and every later ``run``."""
        pairs = tuple(name.items()) if isinstance(name, Mapping) else ((name, value),)
        if not pairs or any(not k for k, _ in pairs):
            raise UserError("with_env: names must not be empty")
        return State(ConfigNode(self, "ENV", pairs=tuple((str(k), str(v)) for k, v in pairs)))

    def with_arg(self, name: str, value: str) -> State:
        """``ARG name=value``: in the environment of every later ``run`` (not in
        the image config), and listed in their history as a Dockerfile's ARGs
        are (``RUN |1 name=value ...``)."""
        if not name or "=" in name:
            raise UserError(f"with_arg: invalid name {name!r}")
        return State(ConfigNode(self, "ARG", pairs=((name, str(value)),)))

    def with_workdir(self, path: str) -> State:
        """``WORKDIR path``: later steps run (and relative paths resolve) there;
        the directory is created, as a Dockerfile's WORKDIR does."""
        return State(ConfigNode(self, "WORKDIR", text=_nonempty(path, "with_workdir")))

    def with_user(self, user: str) -> State:
        """``USER user`` for later ``run`` steps and the image."""
        return State(ConfigNode(self, "USER", text=_nonempty(user, "with_user")))

    def with_entrypoint(self, cmd: str | Sequence[str]) -> State:
        """``ENTRYPOINT`` (a string goes through the image's shell)."""
        return self._cmdlike("ENTRYPOINT", cmd)

    def with_cmd(self, cmd: str | Sequence[str]) -> State:
        """``CMD`` (a string goes through the image's shell)."""
        return self._cmdlike("CMD", cmd)

    def with_label(self, name: str | Mapping[str, str], value: str = "") -> State:
        """``LABEL name=value`` (or each pair of a mapping, in one entry)."""
        pairs = tuple(name.items()) if isinstance(name, Mapping) else ((name, value),)
        if not pairs or any(not k for k, _ in pairs):
            raise UserError("with_label: names must not be empty")
        return State(ConfigNode(self, "LABEL", pairs=tuple((str(k), str(v)) for k, v in pairs)))

    def _cmdlike(self, kind: str, cmd: str | Sequence[str]) -> State:
        if isinstance(cmd, str):
            return State(ConfigNode(self, kind, argv=(cmd,), shell=True))
        argv = tuple(str(a) for a in cmd)
        if not argv:
            raise UserError(f"{kind.lower()}: a command is required")
        return State(ConfigNode(self, kind, argv=argv))


def _nonempty(text: str, what: str) -> str:
    if not text:
        raise UserError(f"{what}: a value is required")
    return text


def _path(text: str, what: str) -> str:
    if not text:
        raise UserError(f"{what}: a path is required")
    return _inside(text, what)


def _inside(path: str, what: str) -> str:
    """A file op's path may not climb out of its root: the worker would clamp
    it, but a graph.v1 definition holding it is refused, so it is refused here
    where the mistake is made."""
    if ".." in path.split("/") or "\x00" in path:
        raise UserError(f"{what}: path {path!r} escapes its root (..)")
    return path


# --- where states start ---------------------------------------------------------


def image(ref: str, *, platform: str = "") -> State:
    """The image ``ref`` (``FROM ref``): its filesystem and config (its ONBUILD
    triggers are a Dockerfile's and do not run)."""
    if not ref or ref.lower() == "scratch":
        return scratch()
    return State(ImageNode(ref, platform))


def scratch() -> State:
    """An empty filesystem (``FROM scratch``)."""
    return State(ScratchNode())


def local(
    name: str = "context", *, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> State:
    """A directory of the client: ``"context"`` is the build's context dir, any
    other name one of ``build(contexts={name: dir})`` (a Dockerfile's
    ``--build-context name=dir``). ``exclude``: .dockerignore patterns;
    ``include``: only what these patterns name is taken. With neither, the
    build's context (``"context"``) leaves out what its ``.dockerignore``
    names, as a Dockerfile build of it does (so both share their cache);
    patterns given here are the whole selection, the file is not read then."""
    if not name or "/" in name:
        raise UserError(f"local: invalid name {name!r}")
    return State(LocalNode(name, tuple(include), tuple(exclude)))


def git(url: str, ref: str = "", *, keep_git_dir: bool = False) -> State:
    """A git repository at ``ref`` (a branch, tag or commit; default the remote's
    HEAD), as ``ADD URL#REF``. A token goes in a ``GIT_AUTH_TOKEN`` secret,
    never in the URL."""
    return State(GitNode(f"{url}#{ref}" if ref else url, keep_git_dir))


def http(url: str, *, checksum: str = "", filename: str = "") -> State:
    """One file downloaded from ``url`` (``ADD URL``), pinned by ``checksum``
    (``sha256:...``) when given. Its file is ``/NAME``: ``filename``, else the
    URL's last path segment (``copy(http(url), "/NAME", dest)``)."""
    if not url.startswith(("http://", "https://")):
        raise UserError(f"http: {url!r} is no http(s) URL")
    return State(HttpNode(url, checksum, filename))


def merge(states: Sequence[State]) -> State:
    """BuildKit's merge: the states' layers applied in order, so each one's files
    land over the ones before (its deletions too). The config is the first's."""
    states = tuple(states)
    if not states:
        raise UserError("merge: at least one state is required")
    return State(MergeNode(states))


def diff(lower: State, upper: State) -> State:
    """BuildKit's diff: what ``upper`` changed relative to ``lower`` (a state
    built on ``lower``, typically); merged over another state, it applies
    those changes there, deletions included."""
    return State(DiffNode(lower, upper))
