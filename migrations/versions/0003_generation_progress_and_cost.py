"""Generation requests: cost (for per-tenant caps), progress and start time (for queue and SSE),
error_code (the HTTP status a failed request answers with).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 09:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | Sequence[str] | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('generation_requests', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cost', sa.BigInteger(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('progress', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('started_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('error_code', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_generation_requests_status'), ['status'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('generation_requests', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_generation_requests_status'))
        batch_op.drop_column('error_code')
        batch_op.drop_column('started_at')
        batch_op.drop_column('progress')
        batch_op.drop_column('cost')
