"""Checkpoint selection: a checkpoint's validation grid (checkpoints.samples), scores per
checkpoint (eval_scores.checkpoint_id; adapter_id may be null while the job has no adapter yet) and
adapters promoted from a checkpoint (adapters.source_job_id, adapters.source_step).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 12:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | Sequence[str] | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.add_column(sa.Column('samples', sa.JSON(), nullable=True))

    with op.batch_alter_table('eval_scores', schema=None) as batch_op:
        batch_op.alter_column('adapter_id', existing_type=sa.String(length=32), nullable=True)
        batch_op.add_column(sa.Column('checkpoint_id', sa.String(length=32), nullable=True))
        batch_op.create_index(batch_op.f('ix_eval_scores_checkpoint_id'), ['checkpoint_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_eval_scores_checkpoint_id_checkpoints'), 'checkpoints',
                                    ['checkpoint_id'], ['id'], ondelete='CASCADE')

    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.add_column(sa.Column('source_job_id', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('source_step', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_adapters_source_job_id'), ['source_job_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_adapters_source_job_id_jobs'), 'jobs',
                                    ['source_job_id'], ['id'], ondelete='SET NULL')


def downgrade() -> None:
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_adapters_source_job_id_jobs'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_adapters_source_job_id'))
        batch_op.drop_column('source_step')
        batch_op.drop_column('source_job_id')

    op.execute("DELETE FROM eval_scores WHERE adapter_id IS NULL")  # checkpoint scores have no place before 0006
    with op.batch_alter_table('eval_scores', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_eval_scores_checkpoint_id_checkpoints'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_eval_scores_checkpoint_id'))
        batch_op.drop_column('checkpoint_id')
        batch_op.alter_column('adapter_id', existing_type=sa.String(length=32), nullable=False)

    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.drop_column('samples')
