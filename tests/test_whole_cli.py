"""main.py on the whole network: rows, the global schedule and one-line option errors."""
import pytest


@pytest.mark.slow
def test_main_prunes_the_whole_network_with_reconstruct_and_fold(tiny_data, checkpoints, run_main, tmp_path):
    from torch_pruning_ext.experiments.results import read_rows
    code, out, err = run_main("--checkpoint", checkpoints[("vgg11_bn", 10)], "--data-dir", tiny_data,
                           "--group_idxs", "all", 1, "--sparsities", 0.5, "--methods", "default", "fold",
                           "--repair", "reconstruct", "--repair-samples", 64, "--output", tmp_path / "rows.csv")
    assert code == 0, err
    rows = read_rows(tmp_path / "rows.csv")
    whole = [r for r in rows if r["group"] == "all"]
    assert {r["method"] for r in whole} == {"default", "fold"}
    assert {r["repair"] for r in whole} == {"reconstruct"} and {r["repair_samples"] for r in whole} == {"64"}
    assert {r["params"] for r in whole} == {"2311562"}  # every group at s=0.5
    assert "all " in out  # the table has a row for the whole network
    code, _, err = run_main("--checkpoint", checkpoints[("vgg11_bn", 10)], "--data-dir", tiny_data,
                         "--group_idxs", "all", "--sparsities", 0.7, "--methods", "default", "--schedule", "global",
                         "--max-layer-sparsity", 0.8, "--output", tmp_path / "global.csv")
    assert code == 0, err
    row, = [r for r in read_rows(tmp_path / "global.csv") if r["method"] == "default"]
    assert row["schedule"] == "global" and row["max_layer_sparsity"] == "0.8"


@pytest.mark.parametrize("argv,message", [
    (["--group_idxs", "every"], "group index must be an integer or 'all', got 'every'"),
    (["--schedule", "local"], "unknown schedule 'local'; choose one of: uniform, global"),
    (["--max-layer-sparsity", "0.8"], "--max-layer-sparsity caps the global schedule; add --schedule global"),
    (["--methods", "folding"], "unknown method 'folding'; choose one of: default, intra_fusion, intra_fusion_fp, fold"),
])
def test_main_whole_network_options_fail_in_one_line(tiny_data, checkpoints, run_main, argv, message):
    code, _, err = run_main("--checkpoint", checkpoints[("vgg11_bn", 10)], "--data-dir", tiny_data, *argv)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
