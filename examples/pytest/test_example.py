"""How another project tests its image with ociworker's pytest plugin.

Only the plugin's fixtures are used: ``ociworker_base_image`` (a busybox image in
``ociworker_registry``, so no Docker Hub is needed) and ``ociworker_build``. Run
with ``pytest`` (root, runc or crun and docker-registry installed), or
``pytest -n 2`` under pytest-xdist, or with ``OCIWORKER_HOST`` set to build on a
daemon.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

GREETER = """\
FROM {base} AS build
WORKDIR /src
COPY greet.sh .
RUN sed 's/@WHO@/pytest/' greet.sh > /greet && chmod 0755 /greet

FROM {base}
COPY --from=build /greet /usr/local/bin/greet
USER user
CMD ["greet"]
"""

SCRIPT = '#!/bin/sh\necho "hello, @WHO@, from $(id -un)"\n'


def test_two_stage_image_runs_its_command(
    ociworker_build: Callable[..., Any], ociworker_base_image: str
) -> None:
    image = ociworker_build(GREETER.format(base=ociworker_base_image), files={"greet.sh": SCRIPT})

    result = image.run(["greet"])

    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello, pytest, from user\n"
    # only the final stage is in the image: its build stage's /src is not
    assert "/usr/local/bin/greet" in image.files()
    assert "/src/greet.sh" not in image.files()
    assert image.config["config"]["User"] == "user"


def test_build_args_and_labels_reach_the_image(
    ociworker_build: Callable[..., Any], ociworker_base_image: str
) -> None:
    dockerfile = f"FROM {ociworker_base_image}\nARG FLAVOUR=plain\nRUN echo $FLAVOUR > /flavour\n"

    image = ociworker_build(dockerfile, build_args={"FLAVOUR": "spicy"}, labels={"team": "images"})

    assert image.read("/flavour") == b"spicy\n"
    assert image.config["config"]["Labels"]["team"] == "images"
    assert image.run("cat /flavour").stdout == "spicy\n"
