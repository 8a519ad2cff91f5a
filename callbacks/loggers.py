"""Loggers that a resumed run continues, each step shown once: <run dir>/csv/metrics.csv and <run dir>/tensorboard.

Lightning's CSVLogger deletes metrics.csv when its directory is not empty, so every resume or requeue of a run
(even one that stops at once on a bad config) loses the steps logged before it. This one keeps the file; the first
row a process logs (step s) tells where the run resumed, and the rows an earlier process logged from step s on
(after its last checkpoint, before it was killed) are dropped, since this process logs those steps again. TensorBoard
keeps one folder (an event file per process); its first step tells TensorBoard to hide the earlier file's events from
that step on.
"""

import csv
import os

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class AppendingWriter(ExperimentWriter):
    def __init__(self, log_dir: str):
        self.resumed = False  # set once this process's first row has cut the file at its step
        super().__init__(log_dir)

    def _check_log_dir_exists(self):
        """Lightning's version deletes metrics.csv here: keep it."""

    def log_metrics(self, metrics_dict: dict, step: int | None = None):
        if not self.resumed:
            self.keep_rows_before(step)
            self.resumed = True
        super().log_metrics(metrics_dict, step)

    def keep_rows_before(self, step: int):
        """Rewrite metrics.csv with only its rows of steps < `step`, and carry its columns on (a later segment may
        log other metrics: Lightning rewrites the header with the union of both)."""
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as file:
            reader = csv.DictReader(file)
            # a row cut short by a kill lacks fields (None): it was logged after the checkpoint anyway
            rows = [row for row in reader if None not in row.values() and int(row["step"]) < step]
            columns = list(reader.fieldnames or [])
        self.metrics_keys = columns
        partial = f"{self.metrics_file_path}.partial"  # a kill while writing leaves the old file whole
        with open(partial, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(partial, self.metrics_file_path)


class AppendingCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv survives a resume (see the module's docstring); same arguments and file format."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class ResumingTensorBoardLogger(TensorBoardLogger):
    """TensorBoardLogger whose first logged step starts a new session there: TensorBoard then purges the events of
    earlier processes from that step on (SummaryWriter's purge_step, whose value is known only once a step is
    logged)."""

    def log_metrics(self, metrics: dict, step: int | None = None):
        if not getattr(self, "session_started", False) and step is not None:
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog

            start = Event(step=step, session_log=SessionLog(status=SessionLog.START))
            self.experiment._get_file_writer().add_event(start)
            self.session_started = True
        super().log_metrics(metrics, step)
