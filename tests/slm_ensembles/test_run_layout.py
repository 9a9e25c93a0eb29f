"""RunLayout: the run folder's paths, and the one place outside it that names a member's folder (the saved
ensemble's own code, which ships without the project) agreeing with it."""

from conftest import build_tiny_llama, build_tokenizer
from ensemble import ModelEnsemble
from slm_ensembles.run_layout import RunLayout


def test_the_paths_of_a_run_folder(tmp_path):
    layout = RunLayout(str(tmp_path))
    assert layout.root == tmp_path  # a string is taken as a Path
    assert [layout.config, layout.manifest, layout.metrics, layout.train_log, layout.samples] == [
        tmp_path / name for name in ("config.yaml", "manifest.json", "metrics.csv", "train_log.csv", "samples.csv")]
    assert layout.member(2) == tmp_path / "ensemble" / "member_2"
    assert layout.best(1) == tmp_path / "checkpoints" / "round_1" / "best"
    assert layout.best(1).parent == layout.checkpoints(1)


def test_a_saved_ensemble_holds_its_members_where_the_layout_looks_for_them(tmp_path):
    tokenizer = build_tokenizer("chatml")
    members = [build_tiny_llama(tokenizer, seed=seed) for seed in (0, 1)]
    layout = RunLayout(tmp_path)
    ModelEnsemble.from_members(members, vocab_size=len(tokenizer)).save_pretrained(layout.ensemble)
    saved = sorted(path for path in layout.ensemble.iterdir() if (path / "config.json").is_file())
    assert saved == [layout.member(0), layout.member(1)]
