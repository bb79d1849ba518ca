package io.statestore.flink;

import io.statestore.flink.StatestoreClient.LeaderState;

import org.apache.flink.runtime.leaderelection.LeaderInformation;
import org.apache.flink.runtime.leaderretrieval.LeaderRetrievalDriver;
import org.apache.flink.runtime.leaderretrieval.LeaderRetrievalDriverFactory;
import org.apache.flink.runtime.leaderretrieval.LeaderRetrievalEventHandler;
import org.apache.flink.runtime.rpc.FatalErrorHandler;

import java.util.function.Consumer;

/** Follows one component's leader information through the client's leadership watch. */
public final class StatestoreLeaderRetrievalDriver implements LeaderRetrievalDriver {

    /** Creates a driver for one component id. */
    public static final class Factory implements LeaderRetrievalDriverFactory {
        private final StatestoreClient client;
        private final String componentId;

        public Factory(StatestoreClient client, String componentId) {
            this.client = client;
            this.componentId = componentId;
        }

        @Override
        public LeaderRetrievalDriver createLeaderRetrievalDriver(
                LeaderRetrievalEventHandler handler, FatalErrorHandler fatalErrorHandler) {
            return new StatestoreLeaderRetrievalDriver(client, componentId, handler);
        }
    }

    private final StatestoreClient client;
    private final Consumer<LeaderState> listener;

    StatestoreLeaderRetrievalDriver(StatestoreClient client, String componentId, LeaderRetrievalEventHandler handler) {
        this.client = client;
        this.listener = s -> handler.notifyLeaderAddress(
                s == null ? LeaderInformation.empty()
                        : StatestoreLeaderElectionDriver.toLeaderInformation(s.info.get(componentId)));
        client.addLeaderListener(listener);
    }

    @Override
    public void close() {
        client.removeLeaderListener(listener);
    }
}
