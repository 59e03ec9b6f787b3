"""The Mount value, as containerd has it: emitted by snapshotters, consumed by
executors and differs. A plain value, no behaviour that touches the host."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mount:
    type: str  # "overlay", "bind", "tmpfs", ...
    source: str
    options: tuple[str, ...] = ()
    target: str = ""  # where inside the container (empty for a rootfs mount)

    def option(self, name: str) -> str | None:
        """Value of ``name=value`` in options, or None."""
        prefix = name + "="
        for opt in self.options:
            if opt.startswith(prefix):
                return opt[len(prefix) :]
        return None

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


def is_bind(m: Mount) -> bool:
    return m.type in ("bind", "rbind") or "bind" in m.options or "rbind" in m.options
