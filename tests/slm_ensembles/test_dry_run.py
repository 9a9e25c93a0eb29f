"""dry_run.py through main.py --dry_run: the teacher cache's size and the GPU memory predicted from the models'
configs (and the prepared data) without loading weights, and what it says when it cannot predict them."""

from transformers import AutoConfig

import main
import preprocess_dataset
from test_main import cli_args, refuse_to_load_weights
from slm_ensembles import compute, dry_run


def test_a_dry_run_predicts_the_teacher_cache_and_the_gpu_memory_without_loading_weights(tiny_teacher_dir, tmp_path,
                                                                                           monkeypatch, capsys):
    refuse_to_load_weights(monkeypatch)
    args = cli_args(tiny_teacher_dir, tmp_path, "--teacher_mode", "topk", "--cache_k", "8", "--student_init",
                    "pretrained", "--student_model", str(tiny_teacher_dir))
    assert main.main([*args, "--dry_run"]) == 0
    out = capsys.readouterr().out
    # The test preset's 40 conversations less 8 held out, up to 96 tokens; k = 8 of a 400-token vocabulary takes
    # 8 x 2 (ids) + 8 (values) + 2 (span) + 2 (tail) = 28 B; 16 B per example index the cache.
    assert "  teacher cache topk: ~43.5 kB (estimated: 32 examples x 96 tokens x 50% supervised x 28 B)\n" in out
    teacher = compute.model_shape(AutoConfig.from_pretrained(tiny_teacher_dir))
    memory = compute.predicted_memory_per_process(
        teacher, teacher, whole_teacher=False, members=[teacher], batch_size=4, max_length=96,
        gradient_checkpointing=False, loss_chunk_size=128, bf16=True)
    assert (f"  GPU memory    ~{dry_run.readable_bytes(memory.total)} per process: teacher head 38.4 kB, student "
            f"{dry_run.readable_bytes(memory.student)} (weights, grads, AdamW, bf16 copy), 1 member "
            f"{dry_run.readable_bytes(memory.members)}, activations {dry_run.readable_bytes(memory.activations)}, "
            f"loss chunk {dry_run.readable_bytes(memory.loss_chunk)}\n") in out
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()  # nothing written
    # Once the data is prepared, its supervised tokens replace the estimate.
    assert main.main([*args, "--prepare_only"]) == 0
    (data_dir,) = (tmp_path / "cache" / "datasets").iterdir()
    train_split = preprocess_dataset.load_dataset_dir(data_dir)[0]["train"]
    supervised = preprocess_dataset.token_count(train_split).supervised
    size = compute.predicted_cache_bytes(28, supervised, len(train_split))
    capsys.readouterr()
    assert main.main([*args, "--dry_run"]) == 0
    assert (f"  teacher cache topk: ~{dry_run.readable_bytes(size)} (from the prepared data: {supervised:,} supervised "
            f"tokens in 32 examples x 28 B)\n") in capsys.readouterr().out


def test_a_dry_run_counts_an_online_teacher_whole_and_has_no_cache(tiny_teacher_dir, tmp_path, monkeypatch, capsys):
    refuse_to_load_weights(monkeypatch)
    assert main.main(cli_args(tiny_teacher_dir, tmp_path, "--dry_run")) == 0  # a random student, the online teacher
    out = capsys.readouterr().out
    teacher = compute.model_shape(AutoConfig.from_pretrained(tiny_teacher_dir))
    assert f"per process: teacher {dry_run.readable_bytes(teacher.parameters * 2)}, student " in out
    assert "teacher cache" not in out


def test_a_dry_run_says_which_model_configs_it_needs_and_exits_0(tmp_path, monkeypatch, capsys):
    refuse_to_load_weights(monkeypatch)
    assert main.main(["--preset", "paper", "--teacher", "example-org/teacher-not-downloaded", "--student_model",
                      "example-org/student-not-downloaded", "--dry_run"]) == 0
    assert ("  predictions   need the config of 'example-org/teacher-not-downloaded' and "
            "'example-org/student-not-downloaded', in no folder or hub cache here (a few KB each): "
            "`hf download example-org/teacher-not-downloaded config.json`; "
            "`hf download example-org/student-not-downloaded config.json`\n") in capsys.readouterr().out
    # A teacher with its config but not its tokenizer (from which transformers makes an empty tokenizer for Qwen2):
    # a random student's vocabulary is not known.
    (tmp_path / "teacher").mkdir()
    AutoConfig.for_model("qwen2").save_pretrained(tmp_path / "teacher")
    assert main.main(["--preset", "test", "--teacher", str(tmp_path / "teacher"), "--dry_run"]) == 0
    assert f"  predictions   need the tokenizer of '{tmp_path / 'teacher'}'" in capsys.readouterr().out
