"""jobs.admitted_at (bounded look-ahead) and the steps table (every step's timeline)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 22:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('admitted_at', sa.DateTime(timezone=True), nullable=True))
    # Jobs already running or prepared before this migration hold their room.
    op.execute("UPDATE jobs SET admitted_at = started_at WHERE status = 'running'")
    op.create_table(
        'steps',
        sa.Column('id', sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column('job_id', sa.String(32), sa.ForeignKey('jobs.id', ondelete='CASCADE'), nullable=False),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('step', sa.String(16), nullable=False),
        sa.Column('part', sa.Integer(), nullable=True),
        sa.Column('worker', sa.String(255), nullable=False),
        sa.Column('device', sa.String(64), nullable=True),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('busy_started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('busy_finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('windows', sa.Integer(), nullable=True),
    )
    op.create_index('ix_steps_job_id', 'steps', ['job_id'])
    op.create_index('ix_steps_worker', 'steps', ['worker'])
    op.create_index('ix_steps_finished_at', 'steps', ['finished_at'])
    op.create_index('ix_jobs_status_admitted', 'jobs', ['status', 'admitted_at'])


def downgrade() -> None:
    op.drop_index('ix_jobs_status_admitted', 'jobs')
    op.drop_table('steps')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('admitted_at')
