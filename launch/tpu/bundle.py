"""The code tarball copied to every worker: the repository's tracked and untracked-but-not-ignored
files (so virtualenvs, run directories and built artifacts stay home)."""
import os
import subprocess
import tarfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
_SKIP_DIRS = {".git", ".venv", ".venv-vllm", "runs", "artifacts", "wandb", "__pycache__", ".pytest_cache"}


def repository_files(root: Path = REPO_ROOT) -> list[str]:
    """Paths relative to `root`: `git ls-files` (tracked + untracked, minus .gitignore'd) when `root`
    is a git checkout, else a walk that skips virtualenvs, caches and run outputs."""
    try:
        listing = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                                  "--exclude-standard"], check=True, capture_output=True, text=True).stdout
        return sorted(p for p in set(listing.split("\0")) if p and (root / p).is_file())
    except (OSError, subprocess.CalledProcessError):
        files = []
        for folder, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
            files += [os.path.relpath(os.path.join(folder, n), root) for n in names if not n.endswith(".pyc")]
        return sorted(files)


def make_bundle(out_path: str | os.PathLike, root: Path = REPO_ROOT) -> tuple[str, int]:
    """Writes a .tar.gz of `repository_files(root)` to out_path. Returns (path, number of files)."""
    files = repository_files(root)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out_path, "w:gz") as tar:
        for relative in files:
            tar.add(root / relative, arcname=relative, recursive=False)
    return str(out_path), len(files)
