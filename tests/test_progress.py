"""The plain progress lines follow Lightning's disable(), its public switch for a progress bar (off on ranks other
than 0): a silenced bar prints no line."""

from lightning.pytorch.demos.boring_classes import BoringModel

from callbacks.progress import ProgressBar
from tests.helpers import quiet_trainer


def fit_printing(bar: ProgressBar, capsys) -> list[str]:
    trainer = quiet_trainer(
        enable_progress_bar=True, enable_checkpointing=False, callbacks=[bar], max_steps=2, log_every_n_steps=1
    )
    trainer.fit(BoringModel())
    return [line.split(" |")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]


def test_plain_lines_are_printed_by_an_enabled_bar_only(capsys):
    assert fit_printing(ProgressBar(plain=True), capsys) == ["step 1/2", "step 2/2"]
    silenced = ProgressBar(plain=True)
    silenced.disable()  # what Lightning does on a rank other than 0
    assert fit_printing(silenced, capsys) == []
