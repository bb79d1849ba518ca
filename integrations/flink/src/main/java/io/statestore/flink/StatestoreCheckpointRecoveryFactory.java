package io.statestore.flink;

import org.apache.flink.api.common.JobID;
import org.apache.flink.core.execution.RecoveryClaimMode;
import org.apache.flink.runtime.checkpoint.CheckpointIDCounter;
import org.apache.flink.runtime.checkpoint.CheckpointRecoveryFactory;
import org.apache.flink.runtime.checkpoint.CheckpointStoreUtil;
import org.apache.flink.runtime.checkpoint.CompletedCheckpoint;
import org.apache.flink.runtime.checkpoint.CompletedCheckpointStore;
import org.apache.flink.runtime.checkpoint.DefaultCompletedCheckpointStore;
import org.apache.flink.runtime.checkpoint.DefaultCompletedCheckpointStoreUtils;
import org.apache.flink.runtime.state.SharedStateRegistry;
import org.apache.flink.runtime.state.SharedStateRegistryFactory;

import java.util.Collection;
import java.util.concurrent.Executor;

/** Flink's DefaultCompletedCheckpointStore over handles {@code <job-id>/checkpoints/<20-digit id>}. */
public final class StatestoreCheckpointRecoveryFactory implements CheckpointRecoveryFactory {

    /** Checkpoint names: the id zero-padded to 20 digits, as statestore's own checkpoints are. */
    static final CheckpointStoreUtil NAMES = new CheckpointStoreUtil() {
        @Override
        public String checkpointIDToName(long checkpointId) {
            return String.format("%020d", checkpointId);
        }

        @Override
        public long nameToCheckpointID(String name) {
            try {
                return Long.parseLong(name);
            } catch (NumberFormatException e) {
                return INVALID_CHECKPOINT_ID;
            }
        }
    };

    private final StatestoreClient client;

    public StatestoreCheckpointRecoveryFactory(StatestoreClient client) {
        this.client = client;
    }

    static String checkpointPrefix(JobID jobId) {
        return jobId + "/checkpoints/";
    }

    /** The start of the name of every counter of the job (deleted together when the job's HA data goes). */
    static String counterPrefix(JobID jobId) {
        return jobId + ".";
    }

    static String counterName(JobID jobId) {
        return counterPrefix(jobId) + "checkpoint-id-counter";
    }

    @Override
    public CompletedCheckpointStore createRecoveredCompletedCheckpointStore(
            JobID jobId, int maxNumberOfCheckpointsToRetain, SharedStateRegistryFactory sharedStateRegistryFactory,
            Executor ioExecutor, RecoveryClaimMode recoveryClaimMode) throws Exception {
        StatestoreStateHandleStore<CompletedCheckpoint> store =
                new StatestoreStateHandleStore<>(client, checkpointPrefix(jobId), "checkpoint");
        Collection<CompletedCheckpoint> completed =
                DefaultCompletedCheckpointStoreUtils.retrieveCompletedCheckpoints(store, NAMES);
        SharedStateRegistry registry = sharedStateRegistryFactory.create(ioExecutor, completed, recoveryClaimMode);
        return new DefaultCompletedCheckpointStore<>(
                maxNumberOfCheckpointsToRetain, store, NAMES, completed, registry, ioExecutor);
    }

    @Override
    public CheckpointIDCounter createCheckpointIDCounter(JobID jobId) {
        return new StatestoreCheckpointIDCounter(client, counterName(jobId));
    }
}
