"""subtasks.incarnation: which start of its worker runs a subtask (a worker restarted under its old name)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 15:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('subtasks') as batch:
        batch.add_column(sa.Column('incarnation', sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('subtasks') as batch:
        batch.drop_column('incarnation')
