"""gcloud command lines for one queued resource, as argv lists (pure functions, nothing runs here).

One slice (`node_count == 1`): the queued resource NAME holds one TPU node also called NAME; code
goes to it with `gcloud compute tpus tpu-vm scp/ssh NAME --worker=all`.
Multi-slice (`node_count > 1`): the nodes are NAME-0 .. NAME-(n-1) (`--node-prefix=NAME`) and
`gcloud compute tpus queued-resources scp/ssh NAME --node=all --worker=all` reaches every worker of
every slice. The TPU runtime wires the slices together over the data-center network (libtpu's
MEGASCALE_* settings); the trainer sees one `jax.devices()` list spanning all slices.
"""
import dataclasses
import re
import shlex

from launch.tpu.accelerators import TpuSlice

PROVISIONING_MODELS = ("on-demand", "spot", "reserved", "best-effort", "guaranteed")
# on-demand is gcloud's default (no flag); best-effort is only in the alpha command group.
_PROVISIONING_FLAGS = {"on-demand": [], "spot": ["--spot"], "reserved": ["--reserved"],
                       "best-effort": ["--best-effort"], "guaranteed": ["--guaranteed"]}
ACTIVE = "ACTIVE"
FAILED_STATES = ("FAILED", "SUSPENDING", "SUSPENDED")
REMOTE_DIR = "jaxrl_vl"                # under the worker's home directory
REMOTE_BUNDLE = "jaxrl_vl_code.tar.gz"  # under the worker's home directory
REMOTE_LOG = "jaxrl_vl_train.log"      # under the worker's home directory
REMOTE_ENV_FILE = "jaxrl_vl_train.env"  # under the worker's home directory (--env values)


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the queued resource lives. `name` is the queued-resource id, the node id of a single
    slice and the node prefix of a multi-slice request."""
    name: str
    zone: str
    project: str
    node_count: int = 1

    def __post_init__(self):
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", self.name):
            raise ValueError(f"NAME={self.name!r}: use lowercase letters, digits and dashes, starting with a letter")
        if not self.zone or not self.project:
            raise ValueError("--zone and --project are required (e.g. --zone=us-west4-a --project=my-project)")
        if self.node_count < 1:
            raise ValueError(f"--node-count={self.node_count}: must be >= 1 (slices)")

    @property
    def multislice(self) -> bool:
        return self.node_count > 1


def _location(target: Target) -> list[str]:
    return [f"--zone={target.zone}", f"--project={target.project}"]


def create_command(target: Target, tpu: TpuSlice, *, runtime_version: str = "", provisioning: str = "on-demand",
                   extra_flags: tuple[str, ...] = ()) -> list[str]:
    """`gcloud [alpha] compute tpus queued-resources create` for one slice or `node_count` slices."""
    if provisioning not in PROVISIONING_MODELS:
        raise ValueError(f"provisioning={provisioning!r}: choose one of {PROVISIONING_MODELS}")
    group = ["gcloud", "alpha"] if provisioning == "best-effort" else ["gcloud"]
    nodes = ([f"--node-count={target.node_count}", f"--node-prefix={target.name}"] if target.multislice
             else [f"--node-id={target.name}"])
    return [*group, "compute", "tpus", "queued-resources", "create", target.name, *nodes,
            f"--accelerator-type={tpu.accelerator_type}",
            f"--runtime-version={runtime_version or tpu.runtime_version}",
            *_location(target), *_PROVISIONING_FLAGS[provisioning], *extra_flags]


def describe_state_command(target: Target) -> list[str]:
    """Prints the queued resource's state (WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, FAILED, ...)."""
    return ["gcloud", "compute", "tpus", "queued-resources", "describe", target.name, *_location(target),
            "--format=value(state.state)"]


def delete_command(target: Target) -> list[str]:
    """Deletes the queued resource and (--force) its running nodes, without a prompt (--quiet)."""
    return ["gcloud", "compute", "tpus", "queued-resources", "delete", target.name, *_location(target),
            "--force", "--quiet"]


def _workers(target: Target, worker: str) -> tuple[list[str], list[str]]:
    """(command group, worker-selection flags) for scp/ssh."""
    if target.multislice:
        return ["compute", "tpus", "queued-resources"], ["--node=all" if worker == "all" else "--node=0",
                                                         f"--worker={worker}"]
    return ["compute", "tpus", "tpu-vm"], [f"--worker={worker}"]


def scp_command(target: Target, local_path: str, remote_path: str, *, worker: str = "all") -> list[str]:
    """Copies a local file to `remote_path` (relative to the home directory) on the workers."""
    group, workers = _workers(target, worker)
    return ["gcloud", *group, "scp", local_path, f"{target.name}:{remote_path}", *workers, *_location(target)]


def ssh_command(target: Target, remote_command: str, *, worker: str = "all") -> list[str]:
    """Runs `remote_command` (a bash command line) on the workers at once; output streams back."""
    group, workers = _workers(target, worker)
    return ["gcloud", *group, "ssh", target.name, *workers, *_location(target), f"--command={remote_command}"]


def install_script(*, code_source: str = "copy", pip_packages: tuple[str, ...] = ("jax[tpu]",)) -> str:
    """Bash run on every worker: unpack (or clone) the code into ~/jaxrl_vl and install it into
    ~/jaxrl_vl/.venv. `code_source` is "copy" (the tarball scp'd first) or "git:URL[#REF]".
    Existing files are overwritten, run directories kept, so rerunning is safe."""
    if code_source == "copy":
        fetch = f"mkdir -p ~/{REMOTE_DIR} && tar -xzf ~/{REMOTE_BUNDLE} -C ~/{REMOTE_DIR}"
    elif code_source.startswith("git:"):
        url, _, ref = code_source[len("git:"):].partition("#")  # not "@": ssh URLs (git@host:org/repo) contain one
        if not url:
            raise ValueError(f"--code={code_source!r}: expected git:URL or git:URL#REF")
        fetch = (f"(test -d ~/{REMOTE_DIR}/.git || git clone {shlex.quote(url)} ~/{REMOTE_DIR})"
                 f" && git -C ~/{REMOTE_DIR} fetch --all --quiet")
        if ref:
            fetch += f" && git -C ~/{REMOTE_DIR} checkout --quiet {shlex.quote(ref)}"
    else:
        raise ValueError(f"--code={code_source!r}: expected 'copy' or 'git:URL[#REF]'")
    packages = " ".join(shlex.quote(p) for p in pip_packages)
    # TPU VM images ship Python 3.10; the project needs >= 3.11: use one if present, else uv's.
    python = ("PY=$(command -v python3.12 || command -v python3.11 || true); if [ -z \"$PY\" ]; then"
              " curl -LsSf https://astral.sh/uv/install.sh | sh && ~/.local/bin/uv python install 3.11"
              " && PY=$(~/.local/bin/uv python find 3.11); fi")
    return (f"set -euo pipefail; {fetch} && cd ~/{REMOTE_DIR}; {python}"
            '; test -x .venv/bin/python || "$PY" -m venv .venv'
            "; .venv/bin/pip install --quiet --upgrade pip"
            f" && .venv/bin/pip install --quiet -e . {packages}")


def train_script(config_path: str, overrides: tuple[str, ...] = (), *, with_env_file: bool = False) -> str:
    """Bash run on every worker at once: the trainer, its output streamed back and kept in
    ~/jaxrl_vl_train.log. The exit status is the trainer's (pipefail). `with_env_file`: export the
    variables of ~/jaxrl_vl_train.env first (secrets travel by scp, never on a command line)."""
    argv = " ".join(shlex.quote(a) for a in [".venv/bin/python", "launch/train.py", "--config", config_path, *overrides])
    source = (f"chmod 600 ~/{REMOTE_ENV_FILE} && set -a && . ~/{REMOTE_ENV_FILE} && set +a && "
              if with_env_file else "")
    return f"set -o pipefail; cd ~/{REMOTE_DIR} && {source}{argv} 2>&1 | tee ~/{REMOTE_LOG}"


def env_file_text(env: dict[str, str]) -> str:
    """KEY='value' lines for ~/jaxrl_vl_train.env. Raises ValueError on a name bash cannot export."""
    for key in env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"--env {key!r}: not a valid environment variable name")
    return "".join(f"{key}={shlex.quote(value)}\n" for key, value in sorted(env.items()))


def logs_script(num_lines: int = 100, follow: bool = True) -> str:
    return f"tail -n {int(num_lines)} {'-F ' if follow else ''}~/{REMOTE_LOG}"


def format_command(argv: list[str]) -> str:
    """A copy-pasteable shell line."""
    return shlex.join(argv)
