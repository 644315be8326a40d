"""The processes a test's run started, found from outside as an operator would (for kill -9)."""

from pathlib import Path


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (Ray puts its workers in process groups of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def command_line(pid: int) -> str:
    """The process's command line (a Ray worker's is its title), "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def ray_processes(root_pid: int, name: str) -> list[int]:
    """Ray worker processes below `root_pid` whose title names `name` (Ray titles them
    `ray::Class.method`, e.g. `ray::TargetActor.logprobs`)."""
    out = []
    for pid in descendants(root_pid):
        title = command_line(pid)
        if title.startswith("ray::") and name in title:
            out.append(pid)
    return out
