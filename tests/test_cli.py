import json

from rlfoundry.cli import main


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


def test_demo_runs(tmp_path):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert summary["kv_cache_matches_full_forward"] and summary["hf_max_logit_diff"] <= 1e-5
