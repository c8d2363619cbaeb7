import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import report  # noqa: E402
import sweep  # noqa: E402
from torch_pruning_ext.experiments.protocol import Protocol  # noqa: E402
from torch_pruning_ext.experiments.results import read_rows  # noqa: E402

MEASURED = ("prune_seconds",)


def sweep_args(run_dir, tiny_data, checkpoints, *extra):
    return ["--run-dir", str(run_dir), "--models", "vgg11_bn", "--checkpoint",
            f"vgg11_bn={checkpoints[('vgg11_bn', 10)]}", "--data-dir", str(tiny_data), "--criteria", "l1",
            "--groups", "0", "7", "whole", "--sparsities", "0.3", "0.6", "--methods", "default", "intra_fusion",
            "--batch-size", "48", *extra]


def cells(path):
    return sorted(tuple((k, v) for k, v in row.items() if k not in MEASURED) for row in read_rows(path))


@pytest.mark.slow
def test_killed_sweep_resumes_without_redoing_or_duplicating(tiny_data, checkpoints, tmp_path, monkeypatch):
    calls = []
    original = Protocol.run_cell

    def dying(self, group, sparsity, method):
        if len(calls) == 4:
            raise KeyboardInterrupt  # the user pressed Ctrl-C in the middle of the sweep
        calls.append((group, sparsity, method))
        return original(self, group, sparsity, method)

    monkeypatch.setattr(Protocol, "run_cell", dying)
    with pytest.raises(KeyboardInterrupt):
        sweep.main(sweep_args(tmp_path / "run", tiny_data, checkpoints))
    partial = read_rows(tmp_path / "run" / "results.csv")
    assert len(partial) == 5  # base + 4 finished cells, no partial row
    monkeypatch.setattr(Protocol, "run_cell", original)
    resumed = []
    monkeypatch.setattr(Protocol, "run_cell", lambda self, *cell: resumed.append(cell) or original(self, *cell))
    assert sweep.main(sweep_args(tmp_path / "run", tiny_data, checkpoints)) == 0
    rows = read_rows(tmp_path / "run" / "results.csv")
    assert len(rows) == 1 + 3 * 2 * 2
    assert len({tuple(r.items()) for r in rows}) == len(rows)
    assert not set(resumed) & set(calls) and len(resumed) == 12 - 4
    assert {r["group"] for r in rows} == {"", "0", "7", "all"}


@pytest.mark.slow
def test_shards_partition_the_sweep(tiny_data, checkpoints, tmp_path, monkeypatch):
    assert sweep.main(sweep_args(tmp_path / "full", tiny_data, checkpoints)) == 0
    for shard in ("1/2", "2/2"):
        assert sweep.main(sweep_args(tmp_path / "sharded", tiny_data, checkpoints, "--shard", shard)) == 0
    assert cells(tmp_path / "sharded" / "results.csv") == cells(tmp_path / "full" / "results.csv")
    for task in ("4", "5"):  # a SLURM job array --array=4-5: the shard comes from the environment
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
        assert sweep.main(sweep_args(tmp_path / "slurm", tiny_data, checkpoints)) == 0
        assert 0 < len(read_rows(tmp_path / "slurm" / "results.csv")) <= len(read_rows(tmp_path / "full" / "results.csv"))
    assert cells(tmp_path / "slurm" / "results.csv") == cells(tmp_path / "full" / "results.csv")
    assert sweep.main(sweep_args(tmp_path / "one", tiny_data, checkpoints, "--shard", "1/2")) == 0
    assert 0 < len(read_rows(tmp_path / "one" / "results.csv")) < len(read_rows(tmp_path / "full" / "results.csv"))


@pytest.mark.slow
def test_sweep_with_synthetic_calibration_keeps_the_inputs_for_a_resumed_run(tiny_data, checkpoints, tmp_path,
                                                                             monkeypatch):
    args = ["--run-dir", str(tmp_path), "--models", "vgg11_bn", "--checkpoint", f"vgg11_bn={checkpoints[('vgg11_bn', 10)]}",
            "--data-dir", str(tiny_data), "--criteria", "l1", "--groups", "7", "--sparsities", "0.5",
            "--methods", "default", "--repair", "none", "reconstruct", "--repair-samples", "6",
            "--calibration", "synthetic", "--batch-size", "48"]
    assert sweep.main(args) == 0
    assert (tmp_path / "synthetic" / "vgg11_bn_n6_seed0.pt").is_file()
    rows = read_rows(tmp_path / "results.csv")
    assert sorted((r["method"], r["repair"], r["calibration"]) for r in rows) == [
        ("base", "none", ""), ("base", "reconstruct", "synthetic"), ("default", "none", ""),
        ("default", "reconstruct", "synthetic")]
    (tmp_path / "results.csv").unlink()  # run again: the synthetic inputs come from the run directory

    def never(*args, **kwargs):
        raise AssertionError("synthesised again")
    monkeypatch.setattr("torch_pruning_ext.experiments.protocol.synthesize_calibration", never)
    assert sweep.main(args) == 0 and len(read_rows(tmp_path / "results.csv")) == 4


def test_bad_sweep_arguments(tiny_data, checkpoints, tmp_path, capsys):
    with pytest.raises(SystemExit):
        sweep.main(sweep_args(tmp_path, tiny_data, checkpoints, "--shard", "3/2"))
    assert "need 1 <= i <= N" in capsys.readouterr().err
    for environment, message in (({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0",
                                   "SLURM_ARRAY_TASK_STEP": "2"}, "SLURM_ARRAY_TASK_STEP is 2"),
                                 ({"SLURM_ARRAY_TASK_ID": "x"}, "pass --shard i/N")):
        with pytest.MonkeyPatch.context() as patch:
            for key, value in environment.items():
                patch.setenv(key, value)
            assert sweep.main(sweep_args(tmp_path, tiny_data, checkpoints)) == 2
        assert message in capsys.readouterr().err
    args = sweep_args(tmp_path, tiny_data, checkpoints)
    args[args.index("7")] = "9"
    assert sweep.main(args) == 2
    assert "group index 9 is not in vgg11_bn: valid indices are 0..7" in capsys.readouterr().err


def _fake_results(path):
    lines = ["model,dataset,criterion,group,sparsity,method,accuracy,params,macs,prune_seconds"]
    lines.append("vgg11_bn,fashion-mnist,l1,,0.0,base,90.0,100,1000,0")
    for group in (0, 1):
        for sparsity in (0.3, 0.6):
            for method, shift in (("default", -10), ("intra_fusion", -2), ("intra_fusion_fp", -12)):
                accuracy = 90 + shift * sparsity * (group + 1)
                lines.append(f"vgg11_bn,fashion-mnist,l1,{group},{sparsity},{method},{accuracy},80,800,0.1")
    lines.append("vgg11_bn,fashion-mnist,l1,all,0.5,default,40.0,25,250,0.2")
    path.write_text("\n".join(lines) + "\n")


def _intro(tmp_path):
    (tmp_path / "intro.md").write_text("Intra-Fusion loses in group 1.\n")
    return tmp_path / "intro.md"


def test_report_tables_summary_and_plots(tmp_path):
    _fake_results(tmp_path / "results.csv")
    assert report.main([str(tmp_path / "results.csv"), "--out-dir", str(tmp_path / "docs"),
                        "--command", "python scripts/sweep.py ...", "--intro", str(_intro(tmp_path))]) == 0
    text = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert text.startswith("# Results\n\nIntra-Fusion loses in group 1.\n")
    assert "| 0 | 87.00 / 89.40 / 86.40 | 84.00 / 88.80 / 82.80 |" in text
    assert "Intra-Fusion vs default pruning: better in 4 of 4 cells, worse in 0; mean gain +5.40 points" in text
    assert "worse in 4; mean gain -1.35 points" in text  # function-preserving loses here: it is said
    assert "worst cell -2.40 (group 1, s=0.6)" in text
    assert "| 0.5 | default pruning | 25 | 250 | 40.00 |" in text
    assert "(points): default pruning 6.75; Intra-Fusion 1.35; Intra-Fusion (function-preserving) 8.10" in text
    for png in ("vgg11_bn_fashion-mnist_l1_curves.png", "vgg11_bn_fashion-mnist_l1_intra_fusion_gain.png"):
        assert (tmp_path / "docs" / png).read_bytes()[:4] == b"\x89PNG"
    assert "python scripts/sweep.py ..." in text


def test_report_missing_file(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope.csv")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_footprint_report_marks_the_pareto_front(tmp_path):
    import footprint_report
    structured = tmp_path / "structured.csv"
    structured.write_text(
        "model,dataset,criterion,group,sparsity,method,accuracy,params,macs,prune_seconds,dense_bytes,"
        "peak_activation_bytes,repair\n"
        "vgg,fm,l1,,0.0,base,93.0,100,10,0,400,64,none\n"
        "vgg,fm,l1,1,0.5,default,80.0,50,5,0,200,32,none\n"
        "vgg,fm,l1,1,0.5,intra_fusion,90.0,50,5,0,200,32,none\n"
        "vgg,fm,l1,1,0.5,intra_fusion,91.0,50,5,0,200,32,data\n"
        "vgg,fm,l1,all,0.7,default,60.0,10,1,0,40,8,none\n")
    unstructured = tmp_path / "summary.csv"
    unstructured.write_text("model,dataset,method,setting,accuracy,params,nonzero_params,weight_sparsity,"
                            "dense_bytes,sparse_bytes,peak_activation_bytes\n"
                            "vgg,fm,global magnitude,s=0.9,85.0,100,10,0.9,400,150,64\n"
                            "vgg,fm,global magnitude,s=0.5,92.0,100,50,0.5,400,450,64\n")
    assert footprint_report.main(["--structured", str(structured), "--unstructured", str(unstructured),
                                  "--out-dir", str(tmp_path)]) == 0
    text = (tmp_path / "FOOTPRINT.md").read_text()
    front = text.split("Pareto front")[1]
    for expected in ("| default pruning (whole network) | l1 group all s=0.7 | 60.00 |",
                     "| global magnitude | s=0.9 | 85.00 |", "| Intra-Fusion + repair data | l1 group 1 s=0.5 | 91.00 |",
                     "| unpruned | unpruned | 93.00 |"):
        assert expected in front
    assert "| default pruning | l1 group 1" not in front  # dominated by Intra-Fusion at the same size
    assert "| Intra-Fusion | l1 group 1" not in front  # dominated by the repaired copy
    assert "s=0.5 | 92.00" not in front  # CSR is larger than dense at 50%: no smaller than unpruned
    assert (tmp_path / "footprint_vgg.png").read_bytes()[:4] == b"\x89PNG"


def test_report_shows_repaired_rows_beside_unrepaired(tmp_path):
    _fake_results(tmp_path / "results.csv")
    text = (tmp_path / "results.csv").read_text().splitlines()
    header = text[0] + ",repair"
    rows = [line + ",none" for line in text[1:]]
    rows += [line.replace(",default,", ",default,").rsplit(",", 4)[0] + ",89.0,80,800,0.1,data"
             for line in text[1:] if ",0.6,default," in line or ",0.6,intra_fusion," in line]
    (tmp_path / "results.csv").write_text("\n".join([header] + rows) + "\n")
    assert report.main([str(tmp_path / "results.csv"), "--out-dir", str(tmp_path / "docs")]) == 0
    out = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "default pruning + repair data" in out and "Intra-Fusion + repair data" in out
    assert "Intra-Fusion + repair data vs default pruning + repair data" in out

    # a page of the repaired cells alone, at one sparsity, with its own plot names
    assert report.main([str(tmp_path / "results.csv"), "--out-dir", str(tmp_path / "docs"), "--name", "REPAIR.md",
                        "--repair", "data", "--sparsities", "0.6", "--plot-prefix", "repair_"]) == 0
    page = (tmp_path / "docs" / "REPAIR.md").read_text()
    assert "| 0 | 89.00 / 89.00 |" in page and "| 1 | 89.00 / 89.00 |" in page
    assert "(points): default pruning + repair data 1.00; Intra-Fusion + repair data 1.00" in page
    assert "s=0.3" not in page and "| 0.5 | default" not in page and "Intra-Fusion vs default pruning:" not in page
    assert (tmp_path / "docs" / "repair_vgg11_bn_fashion-mnist_l1_curves.png").is_file()


def test_report_filters_criteria_and_finetuning(tmp_path, capsys):
    _fake_results(tmp_path / "results.csv")
    lines = (tmp_path / "results.csv").read_text().splitlines()
    header, rows = lines[0] + ",finetune_epochs", [line + ",0" for line in lines[1:]]
    rows += [line.replace(",l1,", ",taylor,") for line in rows]  # a second criterion
    rows += [line.rsplit(",", 5)[0] + ",91.5,80,800,0.1,0.5" for line in rows
             if ",l1,0,0.6,intra_fusion," in line or ",taylor,all,0.5,default," in line]  # fine-tuned copies
    (tmp_path / "results.csv").write_text("\n".join([header] + rows) + "\n")
    args = [str(tmp_path / "results.csv"), "--out-dir", str(tmp_path / "docs")]
    assert report.main(args + ["--criteria", "l1"]) == 0
    page = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "l1 importance" in page and "taylor importance" not in page and "fine-tuning 0.5 ep" in page
    assert "no fine-tuning" not in page
    assert report.main(args + ["--criteria", "l1", "--finetune-epochs", "0"]) == 0
    page = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "fine-tuning 0.5 ep" not in page and "one group pruned, no fine-tuning" in page
    assert report.main(args + ["--criteria", "taylor"]) == 0  # only its whole-network row was fine-tuned
    page = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "Cells: default pruning / Intra-Fusion / Intra-Fusion (function-preserving) (top-1 %, one group " \
           "pruned, no fine-tuning)" in page
    assert "| 0.5 | default pruning + fine-tuning 0.5 ep | 80 | 800 | 91.50 |" in page
    assert report.main(args + ["--criteria", "l1", "--finetune-epochs", "0", "--methods", "default",
                               "intra_fusion"]) == 0
    page = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "Cells: default pruning / Intra-Fusion (top-1 %" in page and "function-preserving" not in page
    assert report.main(args + ["--criteria", "lamp"]) == 2
    assert "no pruned rows match the filters" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main(args + ["--methods", "fusion"])
    assert "invalid choice: 'fusion'" in capsys.readouterr().err


def test_variants_keep_rows_of_different_data_sizes_apart():
    import footprint_report
    import pandas as pd
    row = {"method": "intra_fusion", "repair": "data", "finetune_epochs": 0.5, "thinet_samples": 64.0,
           "taylor_batches": float("nan"), "repair_samples": ""}
    assert report.variant(row) == "intra_fusion+repair_data+finetune_0.5+thinet-samples_64"
    assert report.label(report.variant(row)) == \
        "Intra-Fusion + repair data + fine-tuning 0.5 ep + thinet-samples 64"
    assert report.variant(dict(row, thinet_samples="")) == "intra_fusion+repair_data+finetune_0.5"
    empty = pd.DataFrame(columns=["model", "group", "method", "criterion", "sparsity", "accuracy", "dense_bytes",
                                  "peak_activation_bytes"])
    assert footprint_report.structured_points(empty).empty  # a header-only results file gives no points


@pytest.mark.slow
def test_repair_modes_in_one_sweep_equal_separate_sweeps(tiny_data, checkpoints, tmp_path):
    extra = ["--groups", "1", "6", "--methods", "intra_fusion", "--repair-samples", "32"]
    assert sweep.main(sweep_args(tmp_path / "joint", tiny_data, checkpoints, *extra,
                                 "--repair", "none", "data", "datafree")) == 0  # one shared activation cache
    for mode in ("none", "data", "datafree"):
        assert sweep.main(sweep_args(tmp_path / "apart", tiny_data, checkpoints, *extra, "--repair", mode)) == 0
    joint, apart = cells(tmp_path / "joint" / "results.csv"), cells(tmp_path / "apart" / "results.csv")
    assert joint == apart and len(joint) == 3 * (1 + 2 * 2)


def test_whole_report_gives_synthetic_calibration_its_own_columns(tmp_path):
    import whole_report
    head = "model,dataset,criterion,group,sparsity,method,accuracy,params,macs,prune_seconds,repair,calibration,repair_samples"
    rows = ["vgg11_bn,fashion-mnist,l1,,0.0,base,93.0,100,1000,0,none,,",
            "vgg11_bn,fashion-mnist,l1,all,0.5,fold,92.5,25,250,1,reconstruct,,",
            "vgg11_bn,fashion-mnist,l1,all,0.5,fold,91.0,25,250,1,reconstruct,synthetic,256",
            "vgg11_bn,fashion-mnist,l1,all,0.5,fold,90.5,25,250,1,reconstruct,synthetic,",  # 1024, the default
            "vgg11_bn,fashion-mnist,l1,all,0.5,fold,49.0,25,250,1,variance,,"]
    (tmp_path / "results.csv").write_text("\n".join([head] + rows) + "\n")
    assert whole_report.main([str(tmp_path / "results.csv"), "--out-dir", str(tmp_path)]) == 0
    text = (tmp_path / "WHOLE.md").read_text()
    assert ("| method | repair variance | repair reconstruct | repair reconstruct, 256 synthetic | "
            "repair reconstruct, 1024 synthetic |") in text
    assert "| Model Folding (k-means) | 49.00 | 92.50 | 91.00 | 90.50 |" in text
