"""jobs: the DICOM series a job segments (study and series UIDs, modality, files) and its output format

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 21:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('study_uid', sa.String(64), nullable=True))
        batch.add_column(sa.Column('series_uid', sa.String(64), nullable=True))
        batch.add_column(sa.Column('modality', sa.String(16), nullable=True))
        batch.add_column(sa.Column('source_files', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('output_format', sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        for name in ('output_format', 'source_files', 'modality', 'series_uid', 'study_uid'):
            batch.drop_column(name)
