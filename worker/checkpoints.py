"""Checkpoint evaluation while a job trains: score each new checkpoint's validation grid.

The training loop renders the grid into the checkpoint (``checkpoint_samples``, on for service jobs),
so the pipeline is never loaded twice: this only runs the scorers on those few images, in the
train task, when the task notices a new checkpoint. Each score becomes an ``EvalScore`` row tied to
the checkpoint and a ``score`` job event ``{"metric", "value", "step"}`` (the job page's chart).
Scorers come from ``STYLEINJECT_CHECKPOINT_SCORERS`` (``[]``: off). Unset, only weights already on
the machine are used: clipscore when ``STYLEINJECT_SCORER_PATHS`` names CLIP weights, and on the toy
base model clipscore with the packaged toy CLIP plus toystyle, so the embedded service scores
offline. A scorer that cannot load is reported once (a ``score`` event with ``error``) and the job
trains on.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select

from api.core.db.models import Checkpoint, EvalScore, Job
from api.core.jobs import record_event
from api.core.settings import Settings
from styleinject.names import DEFAULT_SELECT_METRIC

log = logging.getLogger("worker.checkpoints")


def _is_toy_base(base_model: str) -> bool:
    from styleinject.assets import TOY_BASE

    try:
        return Path(base_model).resolve() == TOY_BASE.resolve()
    except (OSError, ValueError):
        return False


def scorer_config(settings: Settings, base_model: str) -> tuple[list[str], dict[str, str]]:
    """The checkpoint scorers' names and weight paths for a job on ``base_model``."""
    paths = dict(settings.scorer_paths)
    toy = _is_toy_base(base_model)
    if toy and "clipscore" not in paths:
        from styleinject.assets import TOY_CLIP

        paths["clipscore"] = str(TOY_CLIP)
    names = settings.checkpoint_scorers
    if names is None:  # only weights that are here: never a hub download in the middle of a job
        names = (["clipscore"] if "clipscore" in paths else []) + (["toystyle"] if toy else [])
    return list(names), paths


class CheckpointScorer:
    """Scores checkpoints of one job; the scorers load on the first checkpoint with samples."""

    def __init__(self, settings: Settings, base_model: str) -> None:
        self.names, self.paths = scorer_config(settings, base_model)
        self.scorers = None
        self.failed = False

    def _load(self) -> list:
        if self.scorers is None:
            from styleinject.eval.runner import build_scorers

            self.scorers = [s.load() for s in build_scorers(self.names, self.paths)]
        return self.scorers

    def score_new(self, session, job_id: str) -> None:
        """Score the job's checkpoints that have samples and no scores yet (oldest first)."""
        if not self.names or self.failed:
            return
        scored = select(EvalScore.checkpoint_id).where(EvalScore.checkpoint_id.is_not(None))
        pending = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.id.not_in(scored))
                                  .order_by(Checkpoint.step)).all()
        for checkpoint in (c for c in pending if c.samples):
            from styleinject.train.validation import score_samples

            try:
                overall = score_samples(checkpoint.path, self._load())
            except Exception as exc:  # noqa: BLE001 - scoring is an extra; training goes on without it
                from styleinject.errors import api_message

                self.failed = True
                error = api_message(exc).strip() or type(exc).__name__
                log.warning("job %s: checkpoint scoring is off for this job: %s", job_id, error)
                record_event(session, job_id, "score", {"metric": ",".join(self.names), "value": None,
                                                        "step": checkpoint.step, "error": error})
                return
            if overall is None:  # the samples were pruned away with the checkpoint folder
                continue
            for metric, stats in overall.items():
                value = float(stats["mean"])
                session.add(EvalScore(checkpoint_id=checkpoint.id, job_id=job_id, metric=metric, value=value,
                                      details={**stats, "step": checkpoint.step}))
                record_event(session, job_id, "score", {"metric": metric, "value": value, "step": checkpoint.step})
        if pending:
            session.flush()
            self.pin_best(session, job_id)

    @staticmethod
    def pin_best(session, job_id: str) -> None:
        """Pin the best checkpoint so far (the job's ``select_metric``) against pruning; unpin the rest.

        Without this, ``keep_checkpoints`` (3 by default) would delete an early best checkpoint before
        the user could promote it. Same rule as the API's ``best`` flag: highest score, later on a tie.
        """
        from styleinject.train.checkpoint import pin_checkpoint, unpin_checkpoint

        job = session.get(Job, job_id)
        metric = (job.params or {}).get("select_metric") or DEFAULT_SELECT_METRIC
        rows = session.execute(select(Checkpoint, EvalScore.value).join(EvalScore, EvalScore.checkpoint_id == Checkpoint.id)
                               .where(Checkpoint.job_id == job_id, EvalScore.metric == metric)
                               .order_by(Checkpoint.step)).all()
        best = None
        for checkpoint, value in rows:
            if Path(checkpoint.path).is_dir() and (best is None or value >= best[1]):
                best = (checkpoint, value)
        for checkpoint, _ in rows:
            if Path(checkpoint.path).is_dir():
                if best is not None and checkpoint is best[0]:
                    pin_checkpoint(checkpoint.path, f"best {metric} so far")
                else:
                    unpin_checkpoint(checkpoint.path)


def attach_final_scores(session, job_id: str, adapter_id: str, step: int) -> None:
    """The final checkpoint holds the adapter's weights: its scores are the adapter's scores."""
    checkpoint = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == step))
    if checkpoint is not None:
        for score in checkpoint.scores:
            score.adapter_id = adapter_id
