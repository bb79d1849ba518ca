package io.statestore.flink;

import io.statestore.flink.StatestoreClient.Resp;
import io.statestore.flink.StatestoreClient.StatestoreException;

import org.apache.flink.api.java.tuple.Tuple2;
import org.apache.flink.runtime.persistence.PossibleInconsistentStateException;
import org.apache.flink.runtime.persistence.StateHandleStore;
import org.apache.flink.runtime.state.RetrievableStateHandle;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.JsonNode;
import org.apache.flink.util.InstantiationUtil;

import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

import java.io.IOException;
import java.io.Serializable;
import java.util.ArrayList;
import java.util.Collection;
import java.util.List;
import java.util.Map;
import java.util.UUID;
import java.util.concurrent.atomic.AtomicBoolean;

/**
 * Flink's StateHandleStore over statestore handles named {@code <prefix><name>}: the serialized
 * state object is the handle's blob, locks are the JobManager session's locks, and every write
 * carries the fencing token.
 */
public final class StatestoreStateHandleStore<T extends Serializable>
        implements StateHandleStore<T, StatestoreResourceVersion> {

    private static final Logger LOG = LoggerFactory.getLogger(StatestoreStateHandleStore.class);

    private final StatestoreClient client;
    private final String prefix;
    private final String metadata;

    public StatestoreStateHandleStore(StatestoreClient client, String prefix, String kind) {
        this.client = client;
        this.prefix = prefix;
        this.metadata = "{\"flink\":\"" + kind + "\"}";
    }

    private String full(String name) {
        return prefix + name;
    }

    @Override
    public RetrievableStateHandle<T> addAndLock(String name, T state) throws Exception {
        byte[] bytes = InstantiationUtil.serializeObject(state);
        String digest = StatestoreClient.sha256(bytes);
        String sid = client.sessionId();
        AtomicBoolean retried = new AtomicBoolean();
        Resp r = putState("adding", name, bytes, digest, sid, null, retried);
        if (r.status == 201) {
            return new StatestoreRetrievableStateHandle<>(full(name), bytes, state);
        }
        client.checkSessionAndFence(r, sid, "add " + full(name));
        if (r.status == 409 && "already-exists".equals(r.type())) {
            if (storedByLostAttempt(name, digest, retried)) {
                return new StatestoreRetrievableStateHandle<>(full(name), bytes, state);
            }
            throw new AlreadyExistException("statestore handle " + full(name) + " already exists");
        }
        throw new StatestoreException("add " + full(name), r);
    }

    @Override
    public void replace(String name, StatestoreResourceVersion version, T state) throws Exception {
        byte[] bytes = InstantiationUtil.serializeObject(state);
        String digest = StatestoreClient.sha256(bytes);
        String sid = client.sessionId();
        AtomicBoolean retried = new AtomicBoolean();
        Resp r = putState("replacing", name, bytes, digest, sid, "\"" + version.value() + "\"", retried);
        if (r.status == 200 || r.status == 201) {
            return;
        }
        client.checkSessionAndFence(r, sid, "replace " + full(name));
        if (r.status == 404) {
            throw new NotExistException("statestore handle " + full(name) + " does not exist");
        }
        if (r.status == 412 && storedByLostAttempt(name, digest, retried)) {
            return;
        }
        throw new StatestoreException("replace " + full(name), r);
    }

    /**
     * One PUT of the state (add, or replace with {@code ifMatch}), fenced and with an idempotency
     * key; {@code retried} is set when the client sent it again after a broken connection. No
     * answer at all is Flink's PossibleInconsistentStateException.
     */
    private Resp putState(String doing, String name, byte[] bytes, String digest, String sid, String ifMatch,
            AtomicBoolean retried) throws Exception {
        try {
            return client.call("PUT", StatestoreClient.handlePath(full(name)), bytes,
                    StatestoreClient.headers("X-Session-Id", sid, "X-Fencing-Token", client.fencingHeader(),
                            "If-Match", ifMatch, "X-Content-SHA256", digest, "X-Handle-Metadata", metadata,
                            "Idempotency-Key", UUID.randomUUID().toString(),
                            "Content-Type", "application/octet-stream"),
                    () -> retried.set(true));
        } catch (IOException e) {
            throw new PossibleInconsistentStateException(doing + " " + full(name) + " may or may not have happened", e);
        }
    }

    /** After a retried PUT was refused: whether an earlier attempt whose answer was lost stored exactly these bytes. */
    private boolean storedByLostAttempt(String name, String digest, AtomicBoolean retried) throws Exception {
        if (!retried.get()) {
            return false;
        }
        JsonNode h = client.getHandle(full(name));
        return h != null && digest.equals(h.path("sha256").asText());
    }

    @Override
    public StatestoreResourceVersion exists(String name) throws Exception {
        JsonNode h = client.getHandle(full(name));
        return h == null ? StatestoreResourceVersion.NOT_EXISTING
                : new StatestoreResourceVersion(h.get("version").asLong());
    }

    @Override
    public RetrievableStateHandle<T> getAndLock(String name) throws Exception {
        String sid = client.sessionId();
        Resp r = client.call("POST", StatestoreClient.handlePath(full(name)) + "/lock", null,
                StatestoreClient.headers("X-Session-Id", sid), null);
        if (r.status == 404) {
            throw new NotExistException("statestore handle " + full(name) + " does not exist");
        }
        client.checkSessionAndFence(r, sid, "lock " + full(name));
        if (r.status != 200) {
            throw new StatestoreException("lock " + full(name), r);
        }
        byte[] bytes = client.getState(full(name));
        if (bytes == null) {
            throw new NotExistException("statestore handle " + full(name) + " vanished");
        }
        return new StatestoreRetrievableStateHandle<>(full(name), bytes, null);
    }

    @Override
    public List<Tuple2<RetrievableStateHandle<T>, String>> getAllAndLock() throws Exception {
        List<Tuple2<RetrievableStateHandle<T>, String>> out = new ArrayList<>();
        for (JsonNode h : client.list(prefix, true)) {
            String fullName = h.get("name").asText();
            byte[] bytes = client.getState(fullName);
            if (bytes == null) {
                continue; // removed since the listing
            }
            out.add(Tuple2.of(new StatestoreRetrievableStateHandle<>(fullName, bytes, null),
                    fullName.substring(prefix.length())));
        }
        return out;
    }

    @Override
    public Collection<String> getAllHandles() throws Exception {
        List<String> names = new ArrayList<>();
        for (JsonNode h : client.list(prefix, false)) {
            names.add(h.get("name").asText().substring(prefix.length()));
        }
        return names;
    }

    @Override
    public boolean releaseAndTryRemove(String name) throws Exception {
        String sid = client.sessionId();
        Resp r = client.call("DELETE", StatestoreClient.handlePath(full(name)), null,
                StatestoreClient.headers("X-Session-Id", sid, "X-Fencing-Token", client.fencingHeader()), null);
        if (r.status == 204 || r.status == 200) {
            return true;
        }
        client.checkSessionAndFence(r, sid, "remove " + full(name));
        if (r.status == 409 && "locked".equals(r.type())) {
            LOG.info("statestore handle {} is still locked by others; kept", full(name));
            return false;
        }
        throw new StatestoreException("remove " + full(name), r);
    }

    @Override
    public void clearEntries() throws Exception {
        removeAll(client, prefix);
    }

    /**
     * Removes every handle under {@code prefix} (bulk call, falling back to one call per handle).
     * Deferred: a handle another session still locks (a predecessor whose session has not expired
     * yet) goes as soon as that lock does, instead of being left behind.
     */
    static void removeAll(StatestoreClient client, String prefix) throws Exception {
        String sid = client.sessionId();
        Map<String, String> h = StatestoreClient.headers("X-Session-Id", sid, "X-Fencing-Token", client.fencingHeader());
        Resp r = client.call("DELETE", "/handles?deferred=true&prefix=" + StatestoreClient.enc(prefix), null, h, null);
        client.checkSessionAndFence(r, sid, "remove " + prefix + "*");
        if (r.status != 200) {
            throw new StatestoreException("remove " + prefix + "*", r);
        }
    }

    @Override
    public void release(String name) throws Exception {
        String sid = client.currentSessionId();
        if (sid == null) {
            return; // no session: no locks
        }
        Resp r = client.call("DELETE", StatestoreClient.handlePath(full(name)) + "/lock", null,
                StatestoreClient.headers("X-Session-Id", sid), null);
        if (r.status != 204 && r.status != 200 && r.status != 404 && r.status != 410) {
            throw new StatestoreException("release " + full(name), r);
        }
    }

    @Override
    public void releaseAll() throws Exception {
        String sid = client.currentSessionId();
        if (sid == null) {
            return;
        }
        Resp r = client.call("DELETE", "/locks?prefix=" + StatestoreClient.enc(prefix), null,
                StatestoreClient.headers("X-Session-Id", sid), null);
        if (r.status == 204 || r.status == 200 || r.status == 410) {
            return;
        }
        for (String name : getAllHandles()) {
            release(name);
        }
    }

    @Override
    public String toString() {
        return "StatestoreStateHandleStore{" + prefix + "}";
    }
}
