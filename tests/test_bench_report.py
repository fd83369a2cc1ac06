"""The report's verdicts on the paper's claims and the reasons it gives where we differ."""

from wsilocal.bench import report
from wsilocal.bench.accuracy import chance_levels

# What random scores reach one time in 20 on a 4 + 4 + 4 test split: balanced accuracy 0.58, AUROC 0.71.
CHANCE_12 = chance_levels([0] * 4 + [1] * 4 + [2] * 4, 3)


def aggregate(row, accuracy, std, balanced, auroc=(0.5, 0.0)):
    return {"task": "morphology", "row": row, "accuracy": {"n": 3, "mean": accuracy, "std": std},
            "balanced_accuracy": {"n": 3, "mean": balanced, "std": 0.0},
            "auroc": {"n": 3, "mean": auroc[0], "std": auroc[1]}}


def accuracy_data(ours_k4, best_mil, *others):
    tasks = {"morphology": {"classes": ["a", "b", "c"], "slides": {"train": 18, "val": 6, "test": 12},
                            "chance_95": CHANCE_12}}
    return {"accuracy": {"tasks": tasks, "settings": {"epochs": 6, "mil_epochs": 50},
                         "aggregates": [ours_k4, best_mil, *others]}}


MIL_ACCURACY = "`morphology`: ours K=4 is more accurate than every tile-based MIL baseline"
MIL_AUROC = "`morphology`: ours K=4 ranks slides (AUROC) better than every tile-based MIL baseline"
SPREAD = f"; {report.SEED_SPREAD_NOTE})"  # how the claims of runs without per-slide predictions end


def claim(claims, start):
    (found,) = [c for c in claims if c["claim"].startswith(start)]
    return found


def test_both_at_chance_says_nothing_was_learnt():
    not_run = {"task": "morphology", "row": "milrnn", "status": "n/a: binary only",
               "accuracy": {"n": 0, "mean": None, "std": None}}  # as the benchmark records a row that cannot run
    claims = report.paper_claims(accuracy_data(aggregate("ours_k4", 0.30, 0.05, 0.34),
                                               aggregate("abmil", 0.33, 0.0, 0.333), not_run))
    c = claim(claims, MIL_ACCURACY)
    assert c["verdict"] == "inconclusive"
    assert c["ours"] == "0.300 ± 0.050 vs best MIL (abmil) 0.330 ± 0.000 (-0.030" + SPREAD
    assert c["why"].startswith("neither learnt the task: both at or below what random scores reach on this test "
                               "split one time in 20 (balanced accuracy 0.58), within the seed-to-seed spread, "
                               "after 6 epochs from random weights on 18 training slides")


def test_auroc_claim_tells_a_ranking_learnt_from_a_threshold_that_has_not_moved():
    # As measured on the context task: ours ranks the test slides well but still calls every slide one class.
    ranks = report.paper_claims(accuracy_data(aggregate("ours_k4", 0.48, 0.06, 0.5, (0.92, 0.06)),
                                              aggregate("abmil", 0.44, 0.0, 0.5, (0.63, 0.03)),
                                              aggregate("maxpool", 0.52, 0.1, 0.55, (0.65, 0.15))))
    assert claim(ranks, MIL_ACCURACY)["verdict"] == "inconclusive"
    c = claim(ranks, MIL_AUROC)
    assert (c["verdict"], c["why"]) == ("agrees", "")
    assert c["paper"] == "TCGA-RCC: 0.9740 vs best MIL 0.9716"  # the paper's AUROC column, CLAM-MB the best MIL
    assert c["ours"] == "0.920 ± 0.060 vs best MIL (maxpool) 0.650 ± 0.150 (+0.270" + SPREAD
    chance = report.paper_claims(accuracy_data(aggregate("ours_k4", 0.3, 0.0, 0.3, (0.55, 0.1)),
                                               aggregate("abmil", 0.3, 0.0, 0.3, (0.41, 0.1))))
    c = claim(chance, MIL_AUROC)
    assert c["verdict"] == "inconclusive" and c["why"].startswith("neither learnt the task: both at or below what "
                                                                  "random scores reach on this test split one time "
                                                                  "in 20 (AUROC 0.71), within the seed-to-seed")
    # The best of several MIL rows at chance looks better than chance by luck: one std below its mean, it is not.
    lucky = report.paper_claims(accuracy_data(aggregate("ours_k4", 0.3, 0.0, 0.3, (0.36, 0.1)),
                                              aggregate("transmil", 0.3, 0.0, 0.3, (0.66, 0.16))))
    assert claim(lucky, MIL_AUROC)["verdict"] == "inconclusive"
    # As measured on the morphology task (generator 1.2): seeds agree, but on 12 test slides random scores reach
    # 0.71 one time in 20, so 0.594 ± 0.028 is chance, not a ranking learnt.
    steady = report.paper_claims(accuracy_data(aggregate("ours_k4", 0.3, 0.0, 0.3, (0.47, 0.09)),
                                               aggregate("transmil", 0.3, 0.0, 0.3, (0.594, 0.028))))
    assert claim(steady, MIL_AUROC)["verdict"] == "inconclusive"
    learnt = report.paper_claims(accuracy_data(aggregate("ours_k4", 0.3, 0.0, 0.3, (0.36, 0.1)),
                                               aggregate("transmil", 0.3, 0.0, 0.3, (0.80, 0.05))))
    assert claim(learnt, MIL_AUROC)["verdict"] == "disagrees"
    data = accuracy_data(aggregate("ours_k4", 0.3, 0.0, 0.3, (0.36, 0.1)),
                         aggregate("transmil", 0.3, 0.0, 0.3, (0.66, 0.05)))
    del data["accuracy"]["tasks"]["morphology"]["chance_95"]  # a report from before the levels: 0.05 above 0.5
    assert claim(report.paper_claims(data), MIL_AUROC)["verdict"] == "disagrees"


def test_a_gap_within_the_seed_spread_is_inconclusive_and_a_real_gap_gets_the_claims_reason():
    claims = report.paper_claims(accuracy_data(aggregate("ours_k4", 0.60, 0.10, 0.6),
                                               aggregate("abmil", 0.65, 0.02, 0.65),
                                               aggregate("ours_k4_norfr", 0.80, 0.01, 0.8)))
    c = claim(claims, MIL_ACCURACY)
    assert c["verdict"] == "inconclusive"
    assert c["why"] == "the gap (-0.050) is within the seed-to-seed spread (std up to 0.100) of a 12-slide test split."
    rfr = claim(claims, "`morphology`: RFR improves the accuracy of K=4")
    assert rfr["verdict"] == "disagrees" and rfr["why"].startswith("RFR regularises towards keeping")
    assert claim(claims, "`morphology`: RFR improves the accuracy of K=8")["verdict"] == "pending"
    behind = report.paper_claims(accuracy_data(aggregate("ours_k4", 0.60, 0.01, 0.6),
                                               aggregate("abmil", 0.80, 0.01, 0.8)))
    c = claim(behind, MIL_ACCURACY)
    assert c["verdict"] == "disagrees" and c["why"].startswith("our trunk learns its features end to end in 6 epochs")


def test_agreement_needs_no_why_and_speed_on_a_cpu_explains_the_ceiling():
    data = accuracy_data(aggregate("ours_k4", 0.9, 0.0, 0.9), aggregate("abmil", 0.7, 0.0, 0.7))
    data["speed"] = {"machine": {"cuda": None}, "records": [{"width": 2048, "height": 2048, "ratio": 1.3}]}
    claims = report.paper_claims(data)
    c = claim(claims, MIL_ACCURACY)
    assert (c["verdict"], c["why"]) == ("agrees", "")
    speed = claim(claims, "whole-slide inference")
    assert speed["verdict"] == "disagrees" and speed["why"] == report.WHY_SPEED
    data["speed"]["machine"]["cuda"] = "NVIDIA H100"  # on a GPU the CPU's compute ceiling does not apply
    assert claim(report.paper_claims(data), "whole-slide inference")["why"] == report.WHY_SPEED_GPU


def test_bench_all_passes_weights_to_the_accuracy_benchmark_only(tmp_path, monkeypatch):
    calls = {}

    def run_section(name, folder, argv):
        calls[name] = list(argv)
        return {"status": "done", "argv": list(argv)}

    monkeypatch.setattr(report, "run_section", run_section)
    report.run_all_benchmarks(tmp_path, sections=["accuracy", "memory"], weights="/w/resnet34.pth", progress=False)
    assert calls == {"accuracy": ["--weights", "/w/resnet34.pth"], "memory": []}
    assert report.FULL_ARGS["accuracy"] == []  # the module's defaults are left as they were


def test_a_shortcut_that_ranks_as_well_as_ours_makes_agreement_inconclusive():
    # The context cohorts before generator 1.2: far slides came out larger, so slide area alone ranked the test split.
    data = accuracy_data(aggregate("ours_k4", 0.9, 0.0, 0.9, (0.92, 0.06)), aggregate("abmil", 0.7, 0.0, 0.7))
    shortcuts = {"slide area (mm²)": 0.875, "tissue area (mm²)": 0.6, "lesion fraction": None}
    data["accuracy"]["tasks"]["morphology"]["shortcuts"] = shortcuts
    c = claim(report.paper_claims(data), MIL_ACCURACY)
    assert c["verdict"] == "inconclusive"
    assert c["why"] == ("slide area (mm²) alone ranks the test slides at AUROC 0.88 (shortcut check in the "
                        "accuracy section), about as well as ours (0.920 ± 0.060): ours may have learnt that "
                        "number rather than the task.")
    c = claim(report.paper_claims(data), MIL_AUROC)  # ranking no better than that number
    assert c["verdict"] == "inconclusive" and "what slide area (mm²) alone reaches here (AUROC 0.88)" in c["why"]
    shortcuts["slide area (mm²)"] = 0.75  # below ours by more than its seed spread: ours ranks better than any
    assert claim(report.paper_claims(data), MIL_AUROC)["verdict"] == "agrees"


def test_a_row_no_better_than_a_number_unrelated_to_the_tissue_learnt_nothing():
    # GABMIL beats random scores (0.71), but lesion fraction alone ranks this test split as well as it does.
    data = accuracy_data(aggregate("ours_k4", 0.5, 0.0, 0.5, (0.521, 0.130)),
                         aggregate("gabmil", 0.5, 0.0, 0.5, (0.850, 0.050)))
    data["accuracy"]["tasks"]["morphology"]["shortcuts"] = {"slide area (mm²)": 0.5, "lesion fraction": 0.85}
    c = claim(report.paper_claims(data), MIL_AUROC)
    assert c["verdict"] == "inconclusive"
    assert c["why"].startswith("neither learnt the task: both at or below what lesion fraction alone reaches here "
                               "(AUROC 0.85), within the seed-to-seed spread")
    data["accuracy"]["tasks"]["morphology"]["shortcuts"] = {"slide area (mm²)": 0.5}  # no such number: gabmil learnt
    assert claim(report.paper_claims(data), MIL_AUROC)["verdict"] == "disagrees"
