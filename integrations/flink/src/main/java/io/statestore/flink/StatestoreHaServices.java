package io.statestore.flink;

import org.apache.flink.api.common.ApplicationID;
import org.apache.flink.api.common.JobID;
import org.apache.flink.configuration.Configuration;
import org.apache.flink.runtime.blob.BlobStoreService;
import org.apache.flink.runtime.checkpoint.CheckpointRecoveryFactory;
import org.apache.flink.runtime.highavailability.AbstractHaServices;
import org.apache.flink.runtime.highavailability.ApplicationResultStoreOptions;
import org.apache.flink.runtime.highavailability.JobResultStoreOptions;
import org.apache.flink.runtime.jobmanager.ApplicationStore;
import org.apache.flink.runtime.jobmanager.ApplicationStoreEntry;
import org.apache.flink.runtime.jobmanager.ApplicationStoreUtil;
import org.apache.flink.runtime.jobmanager.DefaultApplicationStore;
import org.apache.flink.runtime.jobmanager.DefaultExecutionPlanStore;
import org.apache.flink.runtime.jobmanager.ExecutionPlanStore;
import org.apache.flink.runtime.jobmanager.ExecutionPlanStoreUtil;
import org.apache.flink.runtime.jobmanager.NoOpExecutionPlanStoreWatcher;
import org.apache.flink.runtime.leaderretrieval.DefaultLeaderRetrievalService;
import org.apache.flink.runtime.leaderretrieval.LeaderRetrievalService;
import org.apache.flink.streaming.api.graph.ExecutionPlan;

import java.util.concurrent.Executor;

/**
 * Flink HA services on statestore: one namespace per cluster, one session per JobManager process,
 * the namespace's leadership as the process's leadership, leader info per component id.
 *
 * <p>Handles: {@code execution-plans/<job-id>}, {@code applications/<application-id>},
 * {@code <job-id>/checkpoints/<20-digit id>}, {@code job-results/<job-id>},
 * {@code application-results/<application-id>}. Counters: {@code <job-id>.checkpoint-id-counter}.
 * Leader info keys: {@code resource_manager}, {@code dispatcher}, {@code rest_server}, {@code job-<job-id>}.
 */
public final class StatestoreHaServices extends AbstractHaServices {

    static final String EXECUTION_PLANS = "execution-plans/";
    static final String APPLICATIONS = "applications/";

    private final StatestoreClient client;

    StatestoreHaServices(StatestoreClient client, Configuration config, Executor ioExecutor,
                         BlobStoreService blobStore) {
        super(config, new StatestoreLeaderElectionDriver.Factory(client), ioExecutor, blobStore,
                new StatestoreResultStores.Jobs(client, config.get(JobResultStoreOptions.DELETE_ON_COMMIT), ioExecutor),
                new StatestoreResultStores.Applications(client,
                        config.get(ApplicationResultStoreOptions.DELETE_ON_COMMIT), ioExecutor));
        this.client = client;
    }

    @Override
    protected LeaderRetrievalService createLeaderRetrievalService(String componentId) {
        return new DefaultLeaderRetrievalService(new StatestoreLeaderRetrievalDriver.Factory(client, componentId));
    }

    @Override
    protected CheckpointRecoveryFactory createCheckpointRecoveryFactory() {
        return new StatestoreCheckpointRecoveryFactory(client);
    }

    @Override
    protected ExecutionPlanStore createExecutionPlanStore() {
        return new DefaultExecutionPlanStore<>(
                new StatestoreStateHandleStore<ExecutionPlan>(client, EXECUTION_PLANS, "execution-plan"),
                NoOpExecutionPlanStoreWatcher.INSTANCE,
                new ExecutionPlanStoreUtil() {
                    @Override
                    public String jobIDToName(JobID jobId) {
                        return jobId.toString();
                    }

                    @Override
                    public JobID nameToJobID(String name) {
                        return JobID.fromHexString(name);
                    }
                });
    }

    @Override
    protected ApplicationStore createApplicationStore() {
        return new DefaultApplicationStore<>(
                new StatestoreStateHandleStore<ApplicationStoreEntry>(client, APPLICATIONS, "application"),
                new ApplicationStoreUtil() {
                    @Override
                    public String applicationIdToName(ApplicationID id) {
                        return id.toString();
                    }

                    @Override
                    public ApplicationID nameToApplicationId(String name) {
                        return ApplicationID.fromHexString(name);
                    }
                });
    }

    @Override
    protected void internalClose() {
        client.close();
    }

    @Override
    protected void internalCleanup() throws Exception {
        // the whole cluster's HA data: every handle and counter of the namespace (the namespace
        // itself needs admin)
        StatestoreStateHandleStore.removeAll(client, "");
        StatestoreCheckpointIDCounter.deleteAll(client, "");
    }

    @Override
    protected void internalCleanupJobData(JobID jobId) throws Exception {
        // every handle under <job-id>/ (its checkpoints) and every counter named <job-id>.*; the
        // execution plan, job result and leader info are removed by their own stores and by the
        // JobMaster's leader election
        StatestoreStateHandleStore.removeAll(client, jobId + "/");
        StatestoreCheckpointIDCounter.deleteAll(client, StatestoreCheckpointRecoveryFactory.counterPrefix(jobId));
    }

    @Override
    protected String getLeaderPathForResourceManager() {
        return "resource_manager";
    }

    @Override
    protected String getLeaderPathForDispatcher() {
        return "dispatcher";
    }

    @Override
    protected String getLeaderPathForJobManager(JobID jobId) {
        return "job-" + jobId;
    }

    @Override
    protected String getLeaderPathForRestServer() {
        return "rest_server";
    }
}
