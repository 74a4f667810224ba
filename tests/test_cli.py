import json
import sys

import pytest

from rlfoundry.cli import main
from rlfoundry.rl.config import DEFAULT_MODEL as SHIPPED


def test_model_info_glm45_counts(capsys):
    assert main(["model-info", "glm-4.5", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert 350e9 < info["total_params"] < 356e9 and 31.5e9 < info["active_params"] < 32.5e9
    assert main(["model-info", "glm-4.5"]) == 0
    out = capsys.readouterr().out
    assert "352.8B" in out and "32.1B" in out


def test_model_info_bad_path_is_a_clear_error(tmp_path, capsys):
    assert main(["model-info", str(tmp_path)]) == 2
    assert "config.json: no such file" in capsys.readouterr().err
    assert main(["model-info", "glm-5"]) == 2
    assert "'glm-5' is neither a preset (glm-4.5, glm-4.5-air, tiny)" in capsys.readouterr().err


def test_eval_bad_arguments_are_clear_errors(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path), "--task", "countdown"]) == 2
    assert "no config.json there" in capsys.readouterr().err
    model = SHIPPED
    assert main(["eval", "--model", model, "--task", "countdown", "--level", "5"]) == 2
    assert "--level must be in 1..4 for countdown, got 5" in capsys.readouterr().err
    assert main(["eval", "--model", model, "--task", "countdown", "--n", "0"]) == 2
    with pytest.raises(SystemExit):  # argparse: an unknown task is a usage error (exit 2)
        main(["eval", "--model", model, "--task", "sudoku"])
    assert "invalid choice: 'sudoku'" in capsys.readouterr().err


def test_demo_runs_shortened(tmp_path, capsys):
    """The demo's code path with its real configuration, cut to one short step."""
    assert main(["demo", "--out", str(tmp_path), "steps=1", "eval_n=4", "rollout.prompts_per_step=2",
                 "rollout.n_samples_per_prompt=2", "rollout.max_new_tokens=16"]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "before" in out
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and lines[-1]["step"] == 1 and "eval/accuracy" in lines[-1]
    assert (tmp_path / "curves.png").exists()
    if any("train/mismatch_max" in m for m in lines):  # a step with a reward signal was trained
        assert "log-prob mismatch" in out
    assert main(["inspect", str(tmp_path)]) == 0  # the summary's counts are the buffer's
    counts = json.loads(capsys.readouterr().out)
    assert ("1 step, " in out and f"{counts['samples_trained']} samples trained of {counts['samples_generated']} "
            "generated" in " ".join(out.split()))


def test_compile_decode_admission_and_batch_invariance_reach_the_engine_command():
    """`serve --compile-decode` / `rollout.compile_decode` start our engine servers with the flag;
    vLLM compiles its own decode and gets nothing extra. `--admit-quiet-ms` (RL's deterministic
    mode passes 0) likewise; a negative value is refused."""
    from rlfoundry.cli import build_parser
    from rlfoundry.rollout.launch import EngineSpec, RlfoundryBackend, VLLMBackend, serve

    def command(backend, **options):
        return backend.engine_command(EngineSpec("m", max_batch=8, **options), 1234)[0]

    args = build_parser().parse_args(["serve", "--model", "m", "--compile-decode"])
    assert args.compile_decode is True
    assert build_parser().parse_args(["serve", "--model", "m"]).compile_decode is False
    assert "--compile-decode" in command(RlfoundryBackend(), compile_decode=True)
    assert "--compile-decode" not in command(RlfoundryBackend())
    ours = command(RlfoundryBackend(), admit_quiet_ms=0.0)
    assert ours[ours.index("--admit-quiet-ms") + 1] == "0.0"
    assert build_parser().parse_args(["serve", "--model", "m"]).admit_quiet_ms == 3.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model", "m", "--admit-quiet-ms", "-1"])
    assert "--compile-decode" not in command(VLLMBackend(), compile_decode=True)
    # batch invariance: our engine's flag; vLLM cannot, and compiled decoding cannot
    assert "--batch-invariant" in command(RlfoundryBackend(), batch_invariant=True)
    assert build_parser().parse_args(["serve", "--model", "m", "--batch-invariant"]).batch_invariant is True
    with pytest.raises(ValueError, match="batch_invariant"):
        command(VLLMBackend(), batch_invariant=True)
    assert serve(EngineSpec(SHIPPED, batch_invariant=True, compile_decode=True)) == 2  # refused before anything starts
    # the device: ours passes it on (cpu is the default, left out); vLLM's build decides its own
    assert build_parser().parse_args(["serve", "--model", "m"]).device == "cpu"
    assert "--device" not in command(RlfoundryBackend())
    ours = command(RlfoundryBackend(), device="cuda:1")
    assert ours[ours.index("--device") + 1] == "cuda:1"
    with pytest.raises(ValueError, match="--device"):
        command(VLLMBackend(), device="cuda")
    assert serve(EngineSpec(SHIPPED, device="tpu")) == 2 and serve(EngineSpec(SHIPPED, batch_invariant=True, device="cuda")) == 2
    import torch

    if not torch.cuda.is_available():
        assert serve(EngineSpec(SHIPPED, device="cuda")) == 2  # no GPU visible: refused before anything starts
    # extra server arguments go on every command line; each server its share of the cores
    assert command(RlfoundryBackend(["--x", "1"]))[-2:] == ["--x", "1"]
    assert command(VLLMBackend(["--enforce-eager"]))[-1] == "--enforce-eager"
    assert RlfoundryBackend().thread_env(1, 2) == {"OMP_NUM_THREADS": "2"}
    assert VLLMBackend().thread_env(1, 2)["VLLM_CPU_OMP_THREADS_BIND"] == "2-3"


def test_serve_vllm_where_vllm_is_missing_is_refused(monkeypatch, capsys):
    from rlfoundry.rollout.launch import EngineSpec, VLLMBackend, serve

    monkeypatch.setenv("RLFOUNDRY_VLLM_PYTHON", sys.executable)  # this environment has no vLLM
    assert serve(EngineSpec(SHIPPED), backend=VLLMBackend()) == 2
    assert "vLLM is not installed" in capsys.readouterr().err


def test_serve_vllm_args_without_the_vllm_backend_is_refused(capsys):
    """--vllm-args with our backend would be ignored: refused instead, naming the flag."""
    assert main(["serve", "--model", SHIPPED, "--vllm-args=--enforce-eager"]) == 2
    assert "--vllm-args '--enforce-eager': for --backend vllm only" in capsys.readouterr().err


def test_serve_options_the_backend_cannot_run_are_refused(capsys):
    """Each backend's `check` names the option before anything starts (exit 2)."""
    assert main(["serve", "--model", SHIPPED, "--batch-invariant", "--compile-decode"]) == 2
    assert "--batch-invariant needs eager decoding" in capsys.readouterr().err
    assert main(["serve", "--model", SHIPPED, "--device", "tpu"]) == 2
    assert "--device not a torch device" in capsys.readouterr().err
    from rlfoundry.rollout.launch import EngineSpec, VLLMBackend

    assert "vLLM's kernels are not batch-invariant" in VLLMBackend().check(EngineSpec(SHIPPED, batch_invariant=True))
    assert VLLMBackend().check(EngineSpec(SHIPPED)) is None
