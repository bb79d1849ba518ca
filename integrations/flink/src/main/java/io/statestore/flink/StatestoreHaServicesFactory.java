package io.statestore.flink;

import org.apache.flink.configuration.Configuration;
import org.apache.flink.runtime.blob.BlobUtils;
import org.apache.flink.runtime.highavailability.ClientHighAvailabilityServices;
import org.apache.flink.runtime.highavailability.HighAvailabilityServices;
import org.apache.flink.runtime.highavailability.HighAvailabilityServicesFactory;
import org.apache.flink.runtime.leaderretrieval.DefaultLeaderRetrievalService;
import org.apache.flink.runtime.leaderretrieval.LeaderRetrievalService;

import java.util.concurrent.Executor;

/** {@code high-availability.type: io.statestore.flink.StatestoreHaServicesFactory}. */
public final class StatestoreHaServicesFactory implements HighAvailabilityServicesFactory {

    static StatestoreClient client(Configuration conf) {
        return new StatestoreClient(
                conf.get(StatestoreHaOptions.URL),
                conf.get(StatestoreHaOptions.TOKEN),
                StatestoreHaOptions.namespace(conf),
                conf.get(StatestoreHaOptions.SESSION_TTL),
                conf.get(StatestoreHaOptions.RETRY_TIMEOUT),
                conf.get(StatestoreHaOptions.REQUEST_TIMEOUT));
    }

    @Override
    public HighAvailabilityServices createHAServices(Configuration conf, Executor ioExecutor) throws Exception {
        // Flink's BLOB store (job jars) stays on high-availability.storageDir, as with ZooKeeper HA.
        return new StatestoreHaServices(client(conf), conf, ioExecutor, BlobUtils.createBlobStoreFromConfig(conf));
    }

    /** Clients only follow the REST endpoint's leader: no session, no stores. */
    @Override
    public ClientHighAvailabilityServices createClientHAServices(Configuration conf) {
        StatestoreClient client = client(conf);
        return new ClientHighAvailabilityServices() {
            @Override
            public LeaderRetrievalService getClusterRestEndpointLeaderRetriever() {
                return new DefaultLeaderRetrievalService(
                        new StatestoreLeaderRetrievalDriver.Factory(client, "rest_server"));
            }

            @Override
            public void close() {
                client.close();
            }
        };
    }
}
