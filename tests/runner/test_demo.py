"""`disp demo` runs its scenarios side by side on a CPU: one spawned process each, one torch thread
each, every scenario's lines printed as one block in the table's order."""

from __future__ import annotations

import os
import time

from disp_api import PurificationMetrics
from disp_runner.demo import DEMO_SCENARIOS, demo_processes, run_demo
from disp_runner.models.loading import save_model
from disp_runner.reporting import PurificationRow
from tests.operator.standin_runner import evaluation_metrics


def test_one_process_per_thread_on_a_cpu_and_one_on_a_gpu():
    assert demo_processes(2, 4, "cpu") == 2
    assert demo_processes(16, 4, "cpu") == 4  # never more than there are scenarios
    assert demo_processes(1, 4, "cpu") == 1
    assert demo_processes(16, 4, "cuda") == 1


def scenario_row(task, show_progress, say) -> PurificationRow:
    """A scenario that says which process and how many threads ran it (spawned: importable by name)."""
    import torch

    print(f"{task.name}: a stage's progress line")  # side by side: not printed
    say(f"  {task.name}: begins")
    if task.name == "patch-insertion":
        time.sleep(1.0)  # the first row ends last: its block still comes first
    say(f"  {task.name}: pid {os.getpid()} threads {torch.get_num_threads()}")
    return PurificationRow(name=task.name, metrics=PurificationMetrics.model_validate(evaluation_metrics()),
                           localisation=None, stage_seconds={})


def _run(tmp_path, tiny_model, tiny_processor, processes):
    save_model(tiny_model, tiny_processor, tmp_path / "base")
    return run_demo(tmp_path / f"demo-{processes}", tmp_path / "base", scenarios=DEMO_SCENARIOS[:3],
                    show_progress=False, processes=processes, scenario_run=scenario_row)


def test_side_by_side_each_scenario_has_its_own_process_and_thread_and_its_lines_come_as_one_block(
        tmp_path, tiny_model, tiny_processor, capsys):
    rows = _run(tmp_path, tiny_model, tiny_processor, processes=2)
    out = capsys.readouterr().out
    names = ["patch-insertion", "patch-refusal", "patch-misclassification"]
    assert [r.name for r in rows] == names
    assert "3 scenarios at once" not in out and "2 scenarios at once, one process each" in out
    lines = out.splitlines()
    said = [line.strip() for line in lines if line.strip().startswith(tuple(f"{name}:" for name in names))]
    assert said == [text for name in names for text in (f"{name}: begins", next(
        line.strip() for line in lines if line.strip().startswith(f"{name}: pid")))]
    pids = {line.split()[2] for line in said if ": pid " in line}
    assert len(pids) >= 2 and str(os.getpid()) not in pids  # spawned processes, not this one
    import torch

    share = max(1, torch.get_num_threads() // 2)  # this process's threads, shared out between the two
    assert all(line.endswith(f"threads {share}") for line in said if ": pid " in line)
    assert "progress line" not in out
    assert out.index("patch-misclassification: pid") < out.index("scenario ")  # then the table


def test_one_after_another_every_line_is_printed_as_it_comes_in_this_process(tmp_path, tiny_model, tiny_processor,
                                                                               capsys):
    rows = _run(tmp_path, tiny_model, tiny_processor, processes=1)
    out = capsys.readouterr().out
    assert [r.name for r in rows] == ["patch-insertion", "patch-refusal", "patch-misclassification"]
    assert "scenarios at once" not in out and "patch-insertion: a stage's progress line" in out
    assert f"patch-refusal: pid {os.getpid()}" in out


def test_the_table_gives_the_audits_residual_rate_and_verdict_beside_the_measured_asr():
    from disp_runner.reporting import format_purification_table

    metrics = PurificationMetrics.model_validate(evaluation_metrics())
    rows = [PurificationRow("removed", metrics.model_copy(update={"residual_rate": 2 / 64, "residual_sample": 64})),
            PurificationRow("survived", metrics.model_copy(update={"residual_rate": 7 / 12, "residual_sample": 12})),
            PurificationRow("lenient", metrics.model_copy(update={"residual_rate": 7 / 12, "residual_sample": 12}),
                            residual_threshold=0.6),
            PurificationRow("no sample", metrics.model_copy(update={"residual_rate": None, "residual_sample": 0})),
            PurificationRow("third round", metrics.model_copy(update={"residual_rate": 7 / 12, "residual_sample": 12}),
                            rounds=3, kept_round=2)]
    table = format_purification_table(rows).splitlines()
    assert table[0].split()[-3:] == ["residual", "removed", "rounds"]
    cells = {line[:26].strip(): line[26:].replace("(kept ", "(kept_").split()[-3:] for line in table[2:7]}
    assert cells == {"removed": ["3.1%", "True", "1"], "survived": ["58.3%", "False", "1"],
                     "lenient": ["58.3%", "True", "1"], "no sample": ["n/a", "Unknown", "1"],
                     "third round": ["False", "3", "(kept_2)"]}
