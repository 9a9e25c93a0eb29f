"""Upload a finished run's ensemble folder (`RUN/ensemble/`, its model card `README.md` included) to the Hugging Face
Hub, on a branch of its own.

The repository is created private unless --public is given (an existing one is left as it is), and each run gets its
own branch, named from its folder (runs/2026-12-06/run_1 -> `run-2026-12-06-run_1`) or --revision: one repository
keeps every run of a project apart. Load a pushed ensemble with
`AutoModelForCausalLM.from_pretrained(REPO_ID, revision=BRANCH, trust_remote_code=True)`.

Before anything is sent, the run must be finished (every round of its manifest done, the ensemble's config and card
written, each member as its checksums.json recorded it), a Hub token must be found (`huggingface-cli login`, or the
HF_TOKEN environment variable) and the Hub must answer (whoami). Otherwise it says what to do and exits non-zero:
2 for what the user must fix (the run, the token, the repository id), 1 when the Hub cannot be reached or fails.
Nothing in the run folder is ever written. `python main.py --push_to_hub REPO_ID` calls `push_run` after its last
round.

Usage:
    python push.py runs/2026-12-06/run_1 my-name/slm-ensemble                      # private, branch run-2026-12-06-run_1
    python push.py runs/2026-12-06/run_1 my-name/slm-ensemble --public --revision v1
"""

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id

import checksums
import config as config_lib
from slm_ensembles import model_card, processes, run_state
from slm_ensembles.run_layout import RunLayout

try:  # the HTTP client huggingface_hub runs on: httpx2 (huggingface_hub 2.x) or httpx (1.x)
    import httpx2 as _http
except ImportError:  # pragma: no cover - an older huggingface_hub
    import httpx as _http

ENSEMBLE_FOLDER = "ensemble"
# Never uploaded: staging entries a killed save can leave in the folder (.configs.tmp/, member_r.tmp/).
IGNORED = [".*", "*/.*", "*.tmp", "*.tmp/*"]
TRANSPORT_ERRORS = (_http.TransportError, OfflineModeIsEnabled, ConnectionError, TimeoutError)
LOGIN_ADVICE = "log in with `huggingface-cli login` (or `hf auth login`), or set HF_TOKEN to a token with write access"


class PushError(Exception):
    """The run could not be uploaded; the message says why and what to do. The run folder is as it was."""


class NotPushableError(PushError):
    """Something the user must fix first: an unfinished or damaged run, no or a rejected token, a bad repository id."""


class HubUnreachableError(PushError):
    """The Hub could not be reached, or failed."""


@dataclasses.dataclass(frozen=True)
class Pushed:
    repo_id: str
    revision: str
    private: bool
    url: str  # the commit's


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if the Hub accepts it as a repository id (`name` or `owner/name`), else NotPushableError."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise NotPushableError(f"{repo_id!r} is not a Hub repository id (expected OWNER/NAME): {error}") from None
    return repo_id


def run_revision(run_dir: str | Path) -> str:
    """The branch a run is pushed to by default: `run-` and its folder's last two parts (runs/2026-12-06/run_1 ->
    run-2026-12-06-run_1), with anything a git branch name cannot hold replaced by `-`."""
    run_dir = Path(run_dir).resolve()
    name = "-".join(part for part in ("run", run_dir.parent.name, run_dir.name) if part)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")


def hub_token() -> str:
    """The token huggingface_hub would send (HF_TOKEN, or the one `huggingface-cli login` saved); NotPushableError
    saying how to get one when there is none. Read locally: nothing is sent."""
    token = get_token()
    if not token:
        raise NotPushableError(f"no Hugging Face token found, so nothing was uploaded: {LOGIN_ADVICE}")
    return token


def finished_ensemble(run_dir: str | Path) -> Path:
    """The ensemble folder of a finished run, checked without writing anything: every round its manifest plans is
    done, the ensemble's config lists exactly the manifest's members, its model card is written, and each member
    holds what its checksums.json recorded. NotPushableError naming what is wrong otherwise."""
    run_dir = Path(run_dir)
    ensemble_dir = run_dir / ENSEMBLE_FOLDER
    try:
        manifest = run_state.load_manifest(run_dir)
    except config_lib.ConfigError as error:  # a damaged manifest
        raise NotPushableError(str(error)) from None
    if manifest is None:
        raise NotPushableError(f"{run_dir} is not a run folder (no readable {RunLayout.MANIFEST}): pass the folder of "
                               "a finished run, runs/YYYY-MM-DD/run_N")
    unfinished = [index for index, status in manifest["rounds"].items() if status != "done"]
    if unfinished:
        raise NotPushableError(f"{run_dir} has not finished: round(s) {', '.join(unfinished)} are not done; finish "
                               f"it first with `python main.py --resume {run_dir}`")
    try:
        config = json.loads((ensemble_dir / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise NotPushableError(f"{ensemble_dir}/config.json cannot be read ({error}): the ensemble folder is "
                               f"incomplete, and nothing was uploaded") from None
    listed = [f"{ENSEMBLE_FOLDER}/{subfolder}" for subfolder in config.get("member_subfolders", [])]
    if listed != manifest["members"]:
        raise NotPushableError(f"{ensemble_dir}/config.json lists members {listed}, but the run's manifest "
                               f"{manifest['members']}: the ensemble folder is not the run's")
    if not (ensemble_dir / model_card.CARD_FILE).is_file():
        raise NotPushableError(f"{ensemble_dir} has no model card ({model_card.CARD_FILE}): the ensemble folder "
                               "is incomplete, and nothing was uploaded")
    for member in listed:
        problem = checksums.folder_damage(run_dir / member)
        if problem is not None:
            raise NotPushableError(f"{problem}: {run_dir / member} is damaged, and nothing was uploaded; restore it "
                                   "from a copy (its checksums.json says what it held)")
    return ensemble_dir


def push_run(run_dir: str | Path, repo_id: str, private: bool = True, revision: str | None = None) -> Pushed:
    """Upload `run_dir`'s finished ensemble folder to the Hub repository `repo_id` (created, private unless
    `private` is False, if it does not exist), on the branch `revision` (default: run_revision). Everything is
    checked before the first request; the run folder is only read. PushError (NotPushableError or
    HubUnreachableError) when it cannot be done, saying what to do."""
    check_repo_id(repo_id)
    ensemble_dir = finished_ensemble(run_dir)
    revision = revision or run_revision(run_dir)
    api = HfApi(token=hub_token())
    try:
        user = api.whoami()
        repo_url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        api.create_branch(repo_url.repo_id, branch=revision, repo_type="model", exist_ok=True)
        commit = api.upload_folder(repo_id=repo_url.repo_id, folder_path=ensemble_dir, repo_type="model",
                                   revision=revision, ignore_patterns=IGNORED,
                                   commit_message=f"The ensemble of {Path(run_dir).resolve().name} ({revision})")
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        if status in (401, 403):
            raise NotPushableError(f"the Hub refused the token (HTTP {status}): {LOGIN_ADVICE}; nothing was "
                                   f"uploaded ({first_line(error)})") from None
        raise HubUnreachableError(f"the Hub answered HTTP {status} ({first_line(error)}); nothing may have been "
                                  "uploaded: run the same command again") from None
    except TRANSPORT_ERRORS as error:
        raise HubUnreachableError(f"the Hub ({api.endpoint}) cannot be reached ({type(error).__name__}: "
                                  f"{first_line(error)}), so nothing was uploaded: run this where the network "
                                  "reaches it (and HF_HUB_OFFLINE is unset)") from None
    print(f"pushed {ensemble_dir} as {user.get('name', '?')} to {repo_url.repo_id}, branch {revision} "
          f"({'private' if private else 'public'}): {commit.commit_url if hasattr(commit, 'commit_url') else commit}")
    print(f"load it with AutoModelForCausalLM.from_pretrained({repo_url.repo_id!r}, revision={revision!r}, "
          "trust_remote_code=True)")
    return Pushed(repo_url.repo_id, revision, private, str(getattr(commit, "commit_url", commit)))


def push_finished_run(run_dir: Path, repo_id: str) -> Pushed:
    """main.py --push_to_hub: push_run after the run's last round. When that fails, the run stays as it is,
    finished, and the error says how to upload it later."""
    try:
        return push_run(run_dir, repo_id)
    except PushError as error:
        raise type(error)(f"{error}. The run itself is finished in {run_dir}; once that is fixed, upload it with "
                          f"`python push.py {run_dir} {repo_id}`") from None


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a finished run's folder, runs/YYYY-MM-DD/run_N")
    parser.add_argument("repo_id", help="the Hub repository, OWNER/NAME (created if it does not exist)")
    parser.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    parser.add_argument("--revision", default=None, metavar="BRANCH",
                        help="the branch to push to (default: run-YYYY-MM-DD-run_N, from the run folder)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    push_run(args.run_dir, args.repo_id, private=not args.public, revision=args.revision)
    return processes.EXIT_DONE


def run_from_command_line(argv=None) -> int:
    """main() with exit codes: 0 pushed, 2 something to fix first (run, token, repository id), 1 the Hub failed."""
    return processes.run_command(lambda: main(argv), refusals=(NotPushableError,), failures=(HubUnreachableError,))


if __name__ == "__main__":
    sys.exit(run_from_command_line())
