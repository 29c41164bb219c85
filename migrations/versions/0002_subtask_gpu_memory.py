"""subtasks.gpu_peak_bytes: the most GPU memory a slab's inference held

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 15:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('subtasks') as batch:
        batch.add_column(sa.Column('gpu_peak_bytes', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('subtasks') as batch:
        batch.drop_column('gpu_peak_bytes')
