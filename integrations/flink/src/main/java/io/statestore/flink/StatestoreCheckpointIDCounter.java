package io.statestore.flink;

import io.statestore.flink.StatestoreClient.Resp;
import io.statestore.flink.StatestoreClient.StatestoreException;

import org.apache.flink.api.common.JobStatus;
import org.apache.flink.runtime.checkpoint.CheckpointIDCounter;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.node.ObjectNode;

import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

import java.util.UUID;
import java.util.concurrent.CompletableFuture;

/** Flink's checkpoint id counter as the statestore counter {@code <job-id>.checkpoint-id-counter}. */
public final class StatestoreCheckpointIDCounter implements CheckpointIDCounter {

    private static final Logger LOG = LoggerFactory.getLogger(StatestoreCheckpointIDCounter.class);

    private final StatestoreClient client;
    private final String path;
    private volatile long last = INITIAL_CHECKPOINT_ID;

    public StatestoreCheckpointIDCounter(StatestoreClient client, String name) {
        this.client = client;
        this.path = "/counters/" + StatestoreClient.enc(name);
    }

    @Override
    public void start() {}

    /**
     * Deletes every counter whose name starts with {@code prefix} (empty: all of the namespace) in one
     * call, fenced by this process's leadership, so the counters of a job go with it even when
     * nothing names them one by one.
     */
    static void deleteAll(StatestoreClient client, String prefix) throws Exception {
        String what = "delete counters " + prefix + "*";
        Resp r = client.call("DELETE", "/counters?prefix=" + StatestoreClient.enc(prefix), null,
                StatestoreClient.headers("X-Fencing-Token", client.fencingHeader()), null);
        client.checkSessionAndFence(r, null, what);
        if (r.status != 200) {
            throw new StatestoreException(what, r);
        }
    }

    @Override
    public CompletableFuture<Void> shutdown(JobStatus jobStatus) {
        if (jobStatus.isGloballyTerminalState()) {
            try {
                Resp r = client.call("DELETE", path, null,
                        StatestoreClient.headers("X-Fencing-Token", client.fencingHeader()), null);
                if (r.status != 204 && r.status != 200 && r.status != 404) {
                    return CompletableFuture.failedFuture(new StatestoreException("delete counter " + path, r));
                }
            } catch (Exception e) {
                return CompletableFuture.failedFuture(e);
            }
        }
        return CompletableFuture.completedFuture(null);
    }

    @Override
    public long getAndIncrement() throws Exception {
        // one key for all retries of this increment (scoped by the session that sends it):
        // a retry learns the first attempt's value
        String sid = client.sessionId();
        Resp r = client.call("POST", path + "/increment", null,
                StatestoreClient.headers("X-Session-Id", sid, "Idempotency-Key", UUID.randomUUID().toString(),
                        "X-Fencing-Token", client.fencingHeader()), null);
        client.checkSessionAndFence(r, sid, "increment " + path);
        if (r.status != 200) {
            throw new StatestoreException("increment " + path, r);
        }
        long v = r.json().get("value").asLong();
        last = v + 1;
        return v;
    }

    @Override
    public long get() {
        try {
            Resp r = client.call("GET", path, null, null, null);
            if (r.status == 200) {
                last = r.json().get("value").asLong();
            } else {
                LOG.warn("reading {} answered {}", path, r);
            }
        } catch (Exception e) {
            LOG.warn("reading {} failed: {}; answering the last known value", path, e.toString());
        }
        return last;
    }

    @Override
    public void setCount(long newCount) throws Exception {
        ObjectNode body = StatestoreClient.JSON.createObjectNode();
        body.put("value", newCount);
        Resp r = client.call("PUT", path, StatestoreClient.JSON.writeValueAsBytes(body),
                StatestoreClient.headers("Content-Type", "application/json",
                        "X-Fencing-Token", client.fencingHeader()), null);
        client.checkSessionAndFence(r, null, "set " + path);
        if (r.status != 200) {
            throw new StatestoreException("set " + path, r);
        }
        last = newCount;
    }
}
