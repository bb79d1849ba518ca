package io.statestore.flink;

import io.statestore.flink.StatestoreClient.LeaderState;
import io.statestore.flink.StatestoreClient.Resp;

import org.apache.flink.runtime.leaderelection.LeaderElectionDriver;
import org.apache.flink.runtime.leaderelection.LeaderElectionDriverFactory;
import org.apache.flink.runtime.leaderelection.LeaderInformation;
import org.apache.flink.runtime.leaderelection.LeaderInformationRegister;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.JsonNode;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.node.ObjectNode;

import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

import java.io.IOException;
import java.util.HashMap;
import java.util.Map;
import java.util.UUID;
import java.util.function.Consumer;

/**
 * The JobManager process's campaign for the namespace's leadership ({@code POST .../leader?wait=}),
 * with Flink's leader information per component id as leader info entries. Leadership is revoked at
 * once when the session is lost or the watch shows another leader.
 */
public final class StatestoreLeaderElectionDriver implements LeaderElectionDriver {

    private static final Logger LOG = LoggerFactory.getLogger(StatestoreLeaderElectionDriver.class);
    private static final int WAIT_SECONDS = 30;

    /** Creates the driver for Flink's DefaultLeaderElectionService. */
    public static final class Factory implements LeaderElectionDriverFactory {
        private final StatestoreClient client;

        public Factory(StatestoreClient client) {
            this.client = client;
        }

        @Override
        public LeaderElectionDriver create(Listener listener) {
            return new StatestoreLeaderElectionDriver(client, listener);
        }
    }

    private final StatestoreClient client;
    private final Listener listener;
    private final Object lock = new Object();
    private final Thread campaign;
    private final Consumer<LeaderState> leaderListener = this::onLeaderState;
    private volatile boolean running = true;
    private String leaderSession; // the session that leads for us, null when not leading

    StatestoreLeaderElectionDriver(StatestoreClient client, Listener listener) {
        this.client = client;
        this.listener = listener;
        client.onSessionLoss(() -> revoke("statestore session lost"));
        client.addLeaderListener(leaderListener);
        campaign = new Thread(this::campaignLoop, "statestore-leader-campaign");
        campaign.setDaemon(true);
        campaign.start();
    }

    private void campaignLoop() {
        long backoff = 100;
        while (running) {
            try {
                synchronized (lock) {
                    while (running && leaderSession != null) {
                        lock.wait();
                    }
                }
                if (!running) {
                    return;
                }
                String sid = client.sessionId();
                long started = System.nanoTime();
                Resp r = client.once("POST", "/leader?wait=" + WAIT_SECONDS, null,
                        StatestoreClient.headers("X-Session-Id", sid),
                        java.time.Duration.ofSeconds(WAIT_SECONDS + 15));
                if (r.status == 200) {
                    long token = r.json().get("fencing_token").asLong();
                    UUID leaderSessionId = UUID.randomUUID();
                    synchronized (lock) {
                        if (!running || !sid.equals(client.currentSessionId())) {
                            continue;
                        }
                        leaderSession = sid;
                        client.setFencingToken(token);
                    }
                    LOG.info("statestore leadership won by session {} with fencing token {}", sid, token);
                    listener.onGrantLeadership(leaderSessionId);
                } else if (r.status == 409) {
                    // someone else leads; a server without ?wait answers at once: do not spin
                    long ms = (System.nanoTime() - started) / 1_000_000L;
                    if (ms < 1000) {
                        StatestoreClient.sleepQuietly(1000 - ms);
                    }
                } else if (r.status == 410) {
                    client.sessionLost(sid, "campaign answered 410");
                } else {
                    throw new StatestoreClient.StatestoreException("campaign", r);
                }
                backoff = 100;
            } catch (InterruptedException e) {
                return;
            } catch (Exception e) {
                if (!running) {
                    return;
                }
                LOG.warn("statestore leader campaign failed: {}; retrying in {} ms", e.toString(), backoff);
                StatestoreClient.sleepQuietly(backoff);
                backoff = Math.min(backoff * 2, 2000);
            }
        }
    }

    private void revoke(String why) {
        synchronized (lock) {
            if (leaderSession == null) {
                return;
            }
            leaderSession = null;
            lock.notifyAll();
        }
        LOG.warn("statestore leadership revoked: {}", why);
        listener.onRevokeLeadership();
    }

    private void onLeaderState(LeaderState s) {
        String mine;
        synchronized (lock) {
            mine = leaderSession;
        }
        if (mine == null) {
            return;
        }
        if (s == null || !mine.equals(s.leader)) {
            // the watch may show an event older than our win: confirm with a fresh read
            try {
                LeaderState now = client.readLeader();
                if (now != null && mine.equals(now.leader)) {
                    return;
                }
                revoke("the namespace's leader is now " + (now == null ? "nobody" : now.leader));
            } catch (IOException e) {
                LOG.warn("could not confirm leadership: {}", e.toString());
            }
            return;
        }
        Map<String, LeaderInformation> m = new HashMap<>();
        s.info.forEach((k, v) -> {
            LeaderInformation li = toLeaderInformation(v);
            if (!li.isEmpty()) {
                m.put(k, li);
            }
        });
        listener.onLeaderInformationChange(new LeaderInformationRegister(m));
    }

    static LeaderInformation toLeaderInformation(JsonNode v) {
        if (v == null || !v.isObject() || !v.hasNonNull("session_id") || !v.hasNonNull("address")) {
            return LeaderInformation.empty();
        }
        try {
            return LeaderInformation.known(UUID.fromString(v.get("session_id").asText()), v.get("address").asText());
        } catch (IllegalArgumentException e) {
            return LeaderInformation.empty();
        }
    }

    @Override
    public boolean hasLeadership() {
        synchronized (lock) {
            return leaderSession != null;
        }
    }

    @Override
    public void publishLeaderInformation(String componentId, LeaderInformation info) {
        if (info.isEmpty()) {
            deleteLeaderInformation(componentId);
            return;
        }
        String sid;
        synchronized (lock) {
            sid = leaderSession;
        }
        if (sid == null) {
            LOG.info("not publishing leader information of {}: no longer leader", componentId);
            return;
        }
        ObjectNode body = StatestoreClient.JSON.createObjectNode();
        body.put("session_id", info.getLeaderSessionID().toString());
        body.put("address", info.getLeaderAddress());
        try {
            Resp r = client.call("PUT", "/leader/info/" + StatestoreClient.enc(componentId),
                    StatestoreClient.JSON.writeValueAsBytes(body),
                    StatestoreClient.headers("X-Session-Id", sid, "Content-Type", "application/json",
                            "X-Fencing-Token", client.fencingHeader()), null);
            if (r.status == 204 || r.status == 200) {
                LOG.info("published leader information of {}: {}", componentId, info);
            } else if (r.status == 409 || r.status == 410) {
                LOG.warn("leader information of {} refused ({}); leadership is being lost", componentId, r);
                if (r.status == 410) {
                    client.sessionLost(sid, "leader info answered 410");
                }
            } else {
                listener.onError(new StatestoreClient.StatestoreException("publish leader info " + componentId, r));
            }
        } catch (IOException e) {
            listener.onError(e);
        }
    }

    @Override
    public void deleteLeaderInformation(String componentId) {
        String sid;
        synchronized (lock) {
            sid = leaderSession;
        }
        if (sid == null) {
            return; // info entries vanish with the leadership that wrote them
        }
        try {
            Resp r = client.call("DELETE", "/leader/info/" + StatestoreClient.enc(componentId), null,
                    StatestoreClient.headers("X-Session-Id", sid, "X-Fencing-Token", client.fencingHeader()), null);
            if (r.status != 204 && r.status != 200 && r.status != 409) {
                LOG.warn("deleting leader information of {} answered {}", componentId, r);
            }
        } catch (IOException e) {
            LOG.warn("deleting leader information of {} failed: {}", componentId, e.toString());
        }
    }

    @Override
    public void close() {
        running = false;
        client.removeLeaderListener(leaderListener);
        campaign.interrupt();
        String sid;
        synchronized (lock) {
            sid = leaderSession;
            leaderSession = null;
            lock.notifyAll();
        }
        if (sid != null) {
            try {
                client.once("DELETE", "/leader", null, StatestoreClient.headers("X-Session-Id", sid),
                        java.time.Duration.ofSeconds(5));
            } catch (Exception e) {
                LOG.info("resigning statestore leadership failed: {}", e.toString());
            }
        }
    }
}
