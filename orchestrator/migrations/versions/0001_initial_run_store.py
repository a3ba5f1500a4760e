"""initial run store

Revision ID: 0001
Revises: 
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import schemas.models


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('runs',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('stage', sa.String(length=16), nullable=True),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', schemas.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('queued_at', schemas.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('started_at', schemas.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('finished_at', schemas.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('heartbeat_at', schemas.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('dispatcher_id', sa.String(length=64), nullable=True),
    sa.Column('claims', sa.Integer(), nullable=False),
    sa.Column('recoveries', sa.Integer(), nullable=False),
    sa.Column('step', sa.Integer(), nullable=True),
    sa.Column('total_steps', sa.Integer(), nullable=True),
    sa.Column('best_val_loss', sa.Float(), nullable=True),
    sa.Column('repos', sa.JSON(), nullable=True),
    sa.Column('corpus', sa.JSON(), nullable=True),
    sa.Column('results', sa.JSON(), nullable=True),
    sa.Column('metrics', sa.JSON(), nullable=True),
    sa.CheckConstraint("stage IS NULL OR stage IN ('fetch', 'corpus', 'train', 'sample')", name='ck_runs_stage'),
    sa.CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name='ck_runs_status'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.create_index('ix_runs_status_created', ['status', 'created_at'], unique=False)
        batch_op.create_index('ix_runs_status_heartbeat', ['status', 'heartbeat_at'], unique=False)

    op.create_table('artifacts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('run_id', sa.String(length=32), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('key', sa.String(length=512), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('meta', sa.JSON(), nullable=False),
    sa.Column('created_at', schemas.models.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('run_id', 'key', name='uq_artifact_run_key')
    )
    op.create_table('log_lines',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('run_id', sa.String(length=32), nullable=False),
    sa.Column('at', schemas.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('stage', sa.String(length=16), nullable=True),
    sa.Column('message', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('log_lines', schema=None) as batch_op:
        batch_op.create_index('ix_log_run', ['run_id', 'id'], unique=False)

    op.create_table('metric_points',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('run_id', sa.String(length=32), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('train_loss', sa.Float(), nullable=True),
    sa.Column('val_loss', sa.Float(), nullable=True),
    sa.Column('chars_per_sec', sa.Float(), nullable=True),
    sa.Column('lr', sa.Float(), nullable=True),
    sa.Column('recorded_at', schemas.models.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('run_id', 'step', name='uq_metric_run_step')
    )
    op.create_table('stage_attempts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('run_id', sa.String(length=32), nullable=False),
    sa.Column('stage', sa.String(length=16), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('node_id', sa.String(length=64), nullable=True),
    sa.Column('dispatcher_id', sa.String(length=64), nullable=True),
    sa.Column('started_at', schemas.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('finished_at', schemas.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('outcome', sa.String(length=16), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('stage_attempts', schema=None) as batch_op:
        batch_op.create_index('ix_attempts_run', ['run_id', 'stage'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('stage_attempts', schema=None) as batch_op:
        batch_op.drop_index('ix_attempts_run')

    op.drop_table('stage_attempts')
    op.drop_table('metric_points')
    with op.batch_alter_table('log_lines', schema=None) as batch_op:
        batch_op.drop_index('ix_log_run')

    op.drop_table('log_lines')
    op.drop_table('artifacts')
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_index('ix_runs_status_heartbeat')
        batch_op.drop_index('ix_runs_status_created')

    op.drop_table('runs')
