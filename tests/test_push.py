"""push.py and main.py --push_to_hub: a finished run's ensemble folder uploaded to the Hub, never the network.

The uploads go to a stand-in for huggingface_hub's HfApi that checks the arguments the real one takes, and copies
what upload_folder would send (huggingface_hub's own pattern filter) into a local "hub" folder. The failures go
through the real HfApi: with no token, in offline mode, against a local port where nothing listens, and against a
local server that refuses the token, as the Hub does (HTTP 401).
"""

import http.server
import inspect
import json
import shutil
import socket
import threading
import types
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.utils import filter_repo_objects

from conftest import run_test_preset
import main
import push
from slm_ensembles import run_state

REPO = "someone/slm-ensemble"


class FakeHub:
    """What a local stand-in of the Hub received: every call, in order, and the uploaded files by (repo, branch)."""

    def __init__(self, root: Path):
        self.root = root
        self.calls = []
        self.repos = {}  # repo_id -> private
        self.branches = set()  # (repo_id, branch)

    def api_class(self):
        hub = self

        class FakeHfApi:
            endpoint = "https://hub.stand-in"

            def __init__(self, token=None, **kwargs):
                assert token, "HfApi made without a token"
                self.token = token

            def whoami(self, **kwargs):
                hub.record("whoami", token=self.token)
                return {"name": "someone"}

            def create_repo(self, repo_id, *, private=None, repo_type=None, exist_ok=False, **kwargs):
                hub.record("create_repo", repo_id=repo_id, private=private, repo_type=repo_type, exist_ok=exist_ok)
                if repo_id in hub.repos and not exist_ok:
                    raise AssertionError("the repository exists")
                hub.repos.setdefault(repo_id, private)
                return types.SimpleNamespace(repo_id=repo_id)

            def create_branch(self, repo_id, *, branch, repo_type=None, exist_ok=False, **kwargs):
                hub.record("create_branch", repo_id=repo_id, branch=branch, exist_ok=exist_ok)
                assert repo_id in hub.repos, "a branch of a repository not created"
                hub.branches.add((repo_id, branch))

            def upload_folder(self, *, repo_id, folder_path, revision=None, ignore_patterns=None, repo_type=None,
                              commit_message=None, **kwargs):
                folder_path = Path(folder_path)
                hub.record("upload_folder", repo_id=repo_id, revision=revision, folder=folder_path,
                           manifest=json.loads((folder_path.parent / "manifest.json").read_text()))
                assert (repo_id, revision) in hub.branches, "an upload to a branch not created"
                paths = sorted(str(p.relative_to(folder_path)) for p in folder_path.rglob("*") if p.is_file())
                for relative in filter_repo_objects(paths, ignore_patterns=ignore_patterns):
                    target = hub.root / repo_id / revision / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(folder_path / relative, target)
                return types.SimpleNamespace(commit_url=f"{self.endpoint}/{repo_id}/commit/0")

        # The stand-in takes what the real methods take (keyword names), so a call it accepts the real one would.
        for name in ("create_repo", "create_branch", "upload_folder"):
            real = inspect.signature(getattr(huggingface_hub.HfApi, name)).parameters
            fake = inspect.signature(getattr(FakeHfApi, name)).parameters
            assert set(fake) - {"kwargs"} <= set(real), name
        return FakeHfApi

    def record(self, name, **arguments):
        self.calls.append((name, arguments))

    def names(self):
        return [name for name, _ in self.calls]

    def files(self, repo_id: str, revision: str) -> dict[str, bytes]:
        folder = self.root / repo_id / revision
        return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of `folder` with its bytes, and its folders (as None)."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_stand_in_token")


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token_saved"))


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory):
    """A finished test-preset run made with --push_to_hub, its uploads received by a FakeHub: (run folder, hub)."""
    tmp_path = tmp_path_factory.mktemp("pushed")
    hub = FakeHub(tmp_path / "hub")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_TOKEN", "hf_stand_in_token")
        patch.setattr(push, "HfApi", hub.api_class())
        folder = run_test_preset(tmp_path, "--push_to_hub", REPO)
    return folder, hub


@pytest.fixture
def run_copy(pushed_run, tmp_path):
    """A copy of the finished run, in a runs/DAY/run_N folder of its own."""
    folder, _ = pushed_run
    copy = tmp_path / "runs" / folder.parent.name / folder.name
    shutil.copytree(folder, copy)
    return copy


def test_main_pushes_the_ensemble_folder_after_the_last_round_privately_on_the_runs_branch(pushed_run):
    folder, hub = pushed_run
    branch = f"run-{folder.parent.name}-{folder.name}"
    assert hub.names() == ["whoami", "create_repo", "create_branch", "upload_folder"]
    calls = dict(hub.calls)
    assert calls["whoami"] == {"token": "hf_stand_in_token"}
    assert calls["create_repo"] == {"repo_id": REPO, "private": True, "repo_type": "model", "exist_ok": True}
    assert calls["create_branch"]["branch"] == branch
    upload = calls["upload_folder"]
    assert upload["folder"] == folder / "ensemble" and upload["revision"] == branch
    assert set(upload["manifest"]["rounds"].values()) == {"done"}  # after the last round
    assert len(upload["manifest"]["members"]) == 2
    uploaded = hub.files(REPO, branch)
    assert uploaded == folder_files(folder / "ensemble")  # the whole folder, as it is
    assert {"README.md", "config.json", "modeling_slm_ensemble.py", "model_io.py", "member_0/model.safetensors",
            "member_1/checksums.json"} <= set(uploaded)
    assert uploaded["README.md"].startswith(b"---\n")  # the model card
    assert "push_to_hub: " + REPO in (folder / "config.yaml").read_text()


def test_push_py_uploads_a_finished_run_and_never_writes_into_it(run_copy, tmp_path, token, monkeypatch, capsys):
    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(push, "HfApi", hub.api_class())
    (run_copy / "ensemble" / ".configs.tmp").mkdir()  # a staging folder a killed save left: never uploaded
    (run_copy / "ensemble" / ".configs.tmp" / "config.json").write_text("{}")
    before = snapshot(run_copy)
    assert push.run_from_command_line([str(run_copy), REPO]) == 0
    branch = f"run-{run_copy.parent.name}-{run_copy.name}"
    assert hub.repos == {REPO: True}
    assert hub.files(REPO, branch) == {name: data for name, data in folder_files(run_copy / "ensemble").items()
                                       if not name.startswith(".configs.tmp")}
    assert f"revision={branch!r}" in capsys.readouterr().out
    # A second run of the same repository: its own branch; --public asks for a public repository, but one that
    # exists keeps its visibility.
    assert push.run_from_command_line([str(run_copy), REPO, "--revision", "v1", "--public"]) == 0
    assert dict(hub.calls[-3:-2])["create_repo"]["private"] is False
    assert hub.files(REPO, "v1") == hub.files(REPO, branch)
    assert snapshot(run_copy) == before


def test_no_token_is_refused_before_any_request(run_copy, no_token, monkeypatch, capsys):
    sent = []
    monkeypatch.setattr(push.HfApi, "whoami", lambda *args, **kwargs: sent.append("whoami"))
    before = snapshot(run_copy)
    assert push.run_from_command_line([str(run_copy), REPO]) == 2
    error = capsys.readouterr().err
    assert "no Hugging Face token found" in error and "huggingface-cli login" in error and "HF_TOKEN" in error
    assert sent == [] and snapshot(run_copy) == before


@pytest.fixture
def online(monkeypatch):
    """huggingface_hub's offline mode off (conftest turns it on for the suite), for requests to local stand-ins."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once the probe closes


def test_an_unreachable_hub_exits_1_saying_so_and_leaves_the_run_as_it_was(run_copy, token, online, monkeypatch,
                                                                           capsys):
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    before = snapshot(run_copy)
    assert push.run_from_command_line([str(run_copy), REPO]) == 1
    error = capsys.readouterr().err
    assert f"the Hub ({endpoint}) cannot be reached" in error and "nothing was uploaded" in error
    assert snapshot(run_copy) == before


def test_offline_mode_exits_1_naming_it(run_copy, token, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = snapshot(run_copy)
    assert push.run_from_command_line([str(run_copy), REPO]) == 1
    error = capsys.readouterr().err
    assert "cannot be reached" in error and "HF_HUB_OFFLINE" in error
    assert snapshot(run_copy) == before


class RefusingHub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the Hub answers a bad token."""

    def do_GET(self):
        body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_a_token_the_hub_refuses_exits_2_with_what_to_do(run_copy, token, online, monkeypatch, capsys):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RefusingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        before = snapshot(run_copy)
        assert push.run_from_command_line([str(run_copy), REPO]) == 2
    finally:
        server.shutdown()
        server.server_close()
    error = capsys.readouterr().err
    assert "refused the token (HTTP 401)" in error and "huggingface-cli login" in error
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("case", ["unfinished", "damaged member", "no card", "not a run", "bad repo id"])
def test_a_run_that_is_not_finished_and_intact_is_refused_before_any_request(run_copy, tmp_path, token, monkeypatch,
                                                                             capsys, case):
    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(push, "HfApi", hub.api_class())
    target, repo = run_copy, REPO
    if case == "unfinished":
        manifest = json.loads((run_copy / "manifest.json").read_text())
        manifest["rounds"]["1"] = "training"
        (run_copy / "manifest.json").write_text(json.dumps(manifest))
        expected = "round(s) 1 are not done"
    elif case == "damaged member":
        weights = run_copy / "ensemble" / "member_1" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-8])
        expected = "member_1 is damaged"
    elif case == "no card":
        (run_copy / "ensemble" / "README.md").unlink()
        expected = "has no model card"
    elif case == "not a run":
        target = run_copy / "ensemble"
        expected = "is not a run folder"
    else:
        repo = "not a/repo id"
        expected = "is not a Hub repository id"
    before = snapshot(run_copy)
    assert push.run_from_command_line([str(target), repo]) == 2
    assert expected in capsys.readouterr().err
    assert hub.calls == [] and snapshot(run_copy) == before


def test_main_refuses_a_push_without_a_token_before_any_run_folder(tiny_teacher_dir, tmp_path, no_token):
    with pytest.raises(push.NotPushableError, match="huggingface-cli login"):
        main.main(["--preset", "test", "--teacher", str(tiny_teacher_dir), "--output_root", str(tmp_path / "runs"),
                   "--push_to_hub", REPO])
    assert not (tmp_path / "runs").exists()


def test_a_resume_may_set_push_to_hub_and_a_failed_push_leaves_the_finished_run_as_it_was(run_copy, token,
                                                                                         monkeypatch, capsys):
    args = main.parse_args(["--resume", str(run_copy), "--push_to_hub", "someone/other", "--alpha", "0.5"])
    config, _ = run_state.resolve_config(args)
    assert config.push_to_hub == "someone/other"
    with pytest.raises(main.config_lib.ConfigError, match="only total_rounds may change"):
        run_state.resolve_config(main.parse_args(["--resume", str(run_copy), "--push_to_hub", "someone/other",
                                             "--alpha", "0.9"]))
    # The same repository: nothing to rewrite; the Hub is offline, so the push fails after the (no) rounds left.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = snapshot(run_copy)
    monkeypatch.setattr("sys.argv", ["main.py", "--resume", str(run_copy)])
    assert main.run_from_command_line() == 1
    error = capsys.readouterr().err
    assert "cannot be reached" in error and f"python push.py {run_copy} {REPO}" in error
    assert snapshot(run_copy) == before


def test_push_to_hub_must_be_a_repository_id():
    config = main.config_lib.build_config("test", None, {"push_to_hub": REPO})
    assert config.push_to_hub == REPO
    for bad in ["two words", "a/b/c", "-leading", "trailing/"]:
        with pytest.raises(main.config_lib.ConfigError, match="'push_to_hub'.*Hub repository id"):
            main.config_lib.build_config("test", None, {"push_to_hub": bad})
