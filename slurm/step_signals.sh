# Sourced by slurm/train.sbatch and slurm/debug.sbatch, in the repository's root: the batch
# shell's part in a stop. SIGUSR1 sent to it (SLURM's --signal=B:USR1 before the time limit or at
# preemption, `scancel --signal=USR1 --batch`) would kill it, and with it the job, before the
# training processes could save: the trap passes it on to the job step instead (srun forwards it
# to every process of the step), and `wait_for_step` repeats it every 30 s until the step ends.
# The scripts start the step with SIGUSR1 ignored (`bash -c 'trap "" USR1; exec "$@"'` before the
# command) until the program's own handler takes it, ~0.1 s in: one passed on in that moment is
# dropped and the repeat delivers it, where it killed the run (exit 138) with no checkpoint.
SRUN_PID=
STOP_REQUESTED=
LAST_FORWARD=0
forward_stop() {
    if [ -z "$STOP_REQUESTED" ]; then
        echo "=== $(date '+%F %T') SIGUSR1 received: training saves a checkpoint at the next step and stops"
    fi
    STOP_REQUESTED=1
    LAST_FORWARD=$SECONDS
    if [ -n "$SRUN_PID" ]; then kill -USR1 "$SRUN_PID" 2>/dev/null || true; fi
}
trap forward_stop USR1
# Never leave the job step behind if the script ends early.
trap 'if [ -n "$SRUN_PID" ] && kill -0 "$SRUN_PID" 2>/dev/null; then kill -TERM "$SRUN_PID"; fi' EXIT

# After `srun ... &` and SRUN_PID=$!: wait for the step, in short slices (`wait` returns early
# when a trapped signal arrives), repeating a stop every 30 s; STATUS = the step's exit code.
wait_for_step() {
    while kill -0 "$SRUN_PID" 2>/dev/null; do
        sleep 1 &
        wait $! 2>/dev/null || true
        if [ -n "$STOP_REQUESTED" ] && [ $((SECONDS - LAST_FORWARD)) -ge 30 ]; then
            forward_stop
        fi
    done
    STATUS=0
    wait "$SRUN_PID" || STATUS=$?
    SRUN_PID=
}
