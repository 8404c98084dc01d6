# shellcheck shell=bash
# Sourced by the sbatch templates (sbatch copies a script to a spool folder, so they find this file as
# $SLURM_SUBMIT_DIR/slurm/resumable.sh). It runs the training step so that SLURM's warning before the time limit
# ends in a checkpoint and a requeue instead of a kill:
#
#   1. the template asks for the warning on the batch shell only (#SBATCH --signal=B:USR1@SECONDS), because a
#      shell busy in a foreground command handles no signal: the step runs in the background and the shell waits;
#   2. on USR1 (or TERM) the shell sends SIGUSR1 to srun, which passes it to every process of the step: the
#      trainers stop at the next step boundary with a checkpoint and exit with 75 (EX_TEMPFAIL). USR1 and not
#      TERM because srun answers a TERM of its own by SIGKILLing the step;
#   3. when the step has stopped resumably, the job requeues itself (at most MAX_REQUEUES times), keeps its id,
#      appends to the same log, and the same command resumes from the checkpoint (train.resume=auto).
#
# A TERM is SLURM ending the job (scancel, preemption, the time limit without a warning): the trainers get it
# directly from SLURM and save; the job is not requeued from here, because to this shell a cancelled job and a
# preempted one look the same (COMPLETING); with --requeue and PreemptMode=REQUEUE, SLURM requeues it itself.

# EDIT (or export): how many times a job may requeue itself; SLURM_RESTART_COUNT says how many it has.
MAX_REQUEUES=${MAX_REQUEUES:-3}
# Exit statuses of the step that are real failures even after a stop signal: 1 (non-finite) and 2 (config,
# data or launch error) pass unchanged through srun and the deepspeed launcher. torchrun exits 1 after its own
# signal as after any failure, so its template sets this to 2 (a run that failed for real after a warning then
# fails again on resume, without a warning, and stops there).
NO_REQUEUE_STATUS=${NO_REQUEUE_STATUS:-"1 2"}
EXIT_RESUMABLE=75

STOP_SIGNAL=      # the signal this shell got (USR1 or TERM), empty while none came
STEP_PID=         # srun's pid while the step runs

# One line per run: a requeued job appends to the same log, so each run starts with a header that counts it.
mixln_header() {
    local restarts=${SLURM_RESTART_COUNT:-0} array=
    [ -z "${SLURM_ARRAY_JOB_ID:-}" ] || array=" (array ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})"
    echo "==== mixln: job ${SLURM_JOB_ID}${array} run $((restarts + 1)) (SLURM_RESTART_COUNT=$restarts," \
        "MAX_REQUEUES=$MAX_REQUEUES) on ${SLURM_JOB_NODELIST:-?} at $(date '+%Y-%m-%dT%H:%M:%S'): $*"
}

_mixln_on_signal() {
    STOP_SIGNAL=$1
    echo "mixln: job ${SLURM_JOB_ID} got SIG$1 at $(date '+%H:%M:%S'): asking the training step to stop" \
        "with a checkpoint (SIGUSR1 to srun)"
    [ -z "$STEP_PID" ] || kill -USR1 "$STEP_PID" 2>/dev/null || true
}

# run_resumable COMMAND...: run the step (an srun command) with stop signals forwarded; returns 0 when it finished
# or stopped and the job was requeued, 75 when it stopped resumably but was not requeued, else the step's status.
run_resumable() {
    trap '_mixln_on_signal USR1' USR1
    trap '_mixln_on_signal TERM' TERM
    "$@" &
    STEP_PID=$!
    # A signal that came between the start and $!: forward it now (a second SIGUSR1 changes nothing).
    [ -z "$STOP_SIGNAL" ] || kill -USR1 "$STEP_PID" 2>/dev/null || true
    local status
    while :; do
        status=0
        wait "$STEP_PID" || status=$?
        # A trapped signal makes wait return early (status > 128) while the step still runs: wait again.
        if [ "$status" -le 128 ] || ! kill -0 "$STEP_PID" 2>/dev/null; then
            break
        fi
    done
    status=0
    wait "$STEP_PID" || status=$?  # the step's own status (bash keeps it), also when a signal came at its end
    trap '' USR1  # a late warning has nothing left to stop
    trap - TERM
    _mixln_after_step "$status"
}

_mixln_after_step() {
    local status=$1 restarts=${SLURM_RESTART_COUNT:-0} resumable=
    if [ "$status" -eq 0 ]; then
        echo "mixln: job ${SLURM_JOB_ID}: the step finished (exit 0)"
        return 0
    fi
    if [ "$STOP_SIGNAL" = TERM ]; then
        echo "mixln: job ${SLURM_JOB_ID}: SLURM is ending the job (SIGTERM: scancel, preemption or the time" \
            "limit); step exit $status; not requeued from here: a preempted job with --requeue comes back by" \
            "itself, otherwise submit the same command again to resume"
        return "$status"
    fi
    if [ "$status" -eq "$EXIT_RESUMABLE" ]; then
        resumable=1
    elif [ -n "$STOP_SIGNAL" ] && [[ " $NO_REQUEUE_STATUS " != *" $status "* ]]; then
        resumable=1  # after our stop signal a launcher may report its own status instead of the trainers' 75
    fi
    if [ -z "$resumable" ]; then
        echo "mixln: job ${SLURM_JOB_ID}: the step failed (exit $status${STOP_SIGNAL:+, after SIG$STOP_SIGNAL});" \
            "not requeued"
        return "$status"
    fi
    local stopped="stopped with a checkpoint (exit $status)"
    [ "$status" -eq "$EXIT_RESUMABLE" ] || stopped="stopped after SIG$STOP_SIGNAL (exit $status)"
    if [ "$restarts" -ge "$MAX_REQUEUES" ]; then
        echo "mixln: job ${SLURM_JOB_ID}: $stopped but not requeued: it already ran $((restarts + 1)) times" \
            "(MAX_REQUEUES=$MAX_REQUEUES); submit the same command again to resume"
        return "$EXIT_RESUMABLE"
    fi
    echo "mixln: job ${SLURM_JOB_ID}: $stopped; requeueing ($((restarts + 1)) of at most $MAX_REQUEUES); the" \
        "next run resumes from the latest checkpoint"
    # The requeue ends this run with a SIGTERM to this shell, which has nothing left to do but exit.
    trap '' TERM
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        echo "mixln: job ${SLURM_JOB_ID}: scontrol requeue failed (is --requeue allowed here?); submit the" \
            "same command again to resume"
        return "$EXIT_RESUMABLE"
    fi
    return 0
}
