package io.statestore.flink;

import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.JsonNode;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.ObjectMapper;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.node.ObjectNode;

import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

import java.io.IOException;
import java.lang.management.ManagementFactory;
import java.net.URI;
import java.net.URLEncoder;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.function.Consumer;

/**
 * The statestore REST API (rest-v1) for one namespace: HTTP/1.1 calls with retries, the process's
 * one session (kept alive every TTL/3), the current fencing token, and one shared long-poll
 * watch of the namespace's leadership.
 */
public final class StatestoreClient implements AutoCloseable {

    private static final Logger LOG = LoggerFactory.getLogger(StatestoreClient.class);
    static final ObjectMapper JSON = new ObjectMapper();

    /** One HTTP answer. */
    public static final class Resp {
        public final int status;
        public final byte[] body;
        public final HttpResponse<byte[]> raw;

        Resp(HttpResponse<byte[]> raw) {
            this.raw = raw;
            this.status = raw.statusCode();
            this.body = raw.body() == null ? new byte[0] : raw.body();
        }

        public JsonNode json() throws IOException {
            return body.length == 0 ? JSON.createObjectNode() : JSON.readTree(body);
        }

        /** The problem type word (rest-v1 Conventions), or "" when the body is not a problem. */
        public String type() {
            try {
                JsonNode t = json().get("type");
                return t == null ? "" : t.asText();
            } catch (IOException e) {
                return "";
            }
        }

        @Override
        public String toString() {
            return status + " " + new String(body, 0, Math.min(body.length, 400), StandardCharsets.UTF_8);
        }
    }

    /** Thrown when a call answered with a status the caller did not expect. */
    public static final class StatestoreException extends IOException {
        public final Resp resp;

        StatestoreException(String what, Resp resp) {
            super(what + ": " + resp);
            this.resp = resp;
        }
    }

    /** The namespace's leadership as GET .../leader shows it, or null when nobody leads. */
    public static final class LeaderState {
        public final String leader;
        public final long fencingToken;
        public final Map<String, JsonNode> info;

        LeaderState(JsonNode body) {
            this.leader = body.get("leader").asText();
            this.fencingToken = body.get("fencing_token").asLong();
            Map<String, JsonNode> m = new LinkedHashMap<>();
            JsonNode i = body.get("info");
            if (i != null && i.isObject()) {
                i.fields().forEachRemaining(e -> m.put(e.getKey(), e.getValue()));
            }
            this.info = m;
        }

        boolean sameAs(LeaderState o) {
            return o != null && leader.equals(o.leader) && fencingToken == o.fencingToken && info.equals(o.info);
        }
    }

    private final String baseUrl;
    private final String nsPath;
    private final String token;
    private final int ttlSeconds;
    private final Duration retryTimeout;
    private final Duration requestTimeout;
    private final HttpClient http;

    // session state
    private final Object sessionLock = new Object();
    private String sessionId;
    private long lastKeepaliveOkNanos;
    private Thread keeper;
    private final List<Runnable> sessionLossListeners = new CopyOnWriteArrayList<>();

    // fencing
    private volatile Long fencingToken;

    // leader watch
    private final List<Consumer<LeaderState>> leaderListeners = new CopyOnWriteArrayList<>();
    private volatile LeaderState lastLeader;
    private volatile boolean leaderKnown;
    private Thread watcher;

    private volatile boolean closed;

    public StatestoreClient(String url, String token, String namespace, Duration ttl, Duration retryTimeout,
                            Duration requestTimeout) {
        if (url == null || url.isEmpty()) {
            throw new IllegalArgumentException(StatestoreHaOptions.URL.key() + " is not set");
        }
        if (namespace == null || namespace.isEmpty()) {
            throw new IllegalArgumentException("no statestore namespace: set "
                    + StatestoreHaOptions.NAMESPACE.key() + " or high-availability.cluster-id");
        }
        this.baseUrl = url.endsWith("/") ? url.substring(0, url.length() - 1) : url;
        this.nsPath = "/v1/namespaces/" + enc(namespace);
        this.token = token;
        this.ttlSeconds = (int) Math.max(2, ttl.getSeconds());
        this.retryTimeout = retryTimeout;
        this.requestTimeout = requestTimeout;
        this.http = HttpClient.newBuilder()
                .version(HttpClient.Version.HTTP_1_1)
                .connectTimeout(Duration.ofSeconds(5))
                .build();
    }

    public static String enc(String s) {
        return URLEncoder.encode(s, StandardCharsets.UTF_8).replace("+", "%20");
    }

    public static String sha256(byte[] data) {
        try {
            return HexFormat.of().formatHex(MessageDigest.getInstance("SHA-256").digest(data));
        } catch (Exception e) {
            throw new IllegalStateException(e);
        }
    }

    public int ttlSeconds() {
        return ttlSeconds;
    }

    // ------------------------------------------------------------------ HTTP

    /** One request, no retries. {@code path} is relative to the namespace unless it starts with "/v1/". */
    public Resp once(String method, String path, byte[] body, Map<String, String> headers, Duration timeout)
            throws IOException, InterruptedException {
        String full = path.startsWith("/v1/") ? path : nsPath + path;
        HttpRequest.Builder b = HttpRequest.newBuilder(URI.create(baseUrl + full))
                .timeout(timeout == null ? requestTimeout : timeout)
                .method(method, body == null ? HttpRequest.BodyPublishers.noBody()
                        : HttpRequest.BodyPublishers.ofByteArray(body));
        if (token != null && !token.isEmpty()) {
            b.header("Authorization", "Bearer " + token);
        }
        if (headers != null) {
            headers.forEach(b::header);
        }
        return new Resp(http.send(b.build(), HttpResponse.BodyHandlers.ofByteArray()));
    }

    /**
     * A request retried with backoff while statestore is unreachable or answers 503, for up to the
     * retry timeout. {@code onRetry} runs before each retry (e.g. to note that an earlier attempt may
     * have taken effect).
     */
    public Resp call(String method, String path, byte[] body, Map<String, String> headers, Runnable onRetry)
            throws IOException {
        long deadline = System.nanoTime() + retryTimeout.toNanos();
        long backoff = 100;
        IOException last = null;
        while (true) {
            if (closed) {
                throw new IOException("statestore client closed");
            }
            try {
                Resp r = once(method, path, body, headers, null);
                if (r.status != 503 && r.status != 502 && r.status != 504) {
                    return r;
                }
                last = new StatestoreException(method + " " + path, r);
            } catch (IOException e) {
                last = e;
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
                throw new IOException("interrupted", e);
            }
            if (System.nanoTime() + backoff * 1_000_000L > deadline) {
                throw last;
            }
            LOG.warn("statestore {} {} failed ({}); retrying in {} ms", method, path, last.getMessage(), backoff);
            sleepQuietly(backoff);
            backoff = Math.min(backoff * 2, 2000);
            if (onRetry != null) {
                onRetry.run();
            }
        }
    }

    static void sleepQuietly(long ms) {
        try {
            Thread.sleep(ms);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }

    static Map<String, String> headers(String... kv) {
        Map<String, String> m = new LinkedHashMap<>();
        for (int i = 0; i + 1 < kv.length; i += 2) {
            if (kv[i + 1] != null) {
                m.put(kv[i], kv[i + 1]);
            }
        }
        return m;
    }

    // ------------------------------------------------------------------ session

    /** The process's live session, created on first use (retrying while statestore is unreachable). */
    public String sessionId() throws IOException {
        synchronized (sessionLock) {
            if (sessionId != null) {
                return sessionId;
            }
            ObjectNode req = JSON.createObjectNode();
            req.put("ttl_seconds", ttlSeconds);
            req.put("owner", "flink-jm-" + ManagementFactory.getRuntimeMXBean().getName());
            Resp r = call("POST", "/v1/sessions", JSON.writeValueAsBytes(req),
                    headers("Content-Type", "application/json"), null);
            if (r.status != 201 && r.status != 200) {
                throw new StatestoreException("create session", r);
            }
            sessionId = r.json().get("session_id").asText();
            lastKeepaliveOkNanos = System.nanoTime();
            LOG.info("statestore session {} (ttl {} s)", sessionId, ttlSeconds);
            if (keeper == null) {
                keeper = new Thread(this::keepAliveLoop, "statestore-session-keepalive");
                keeper.setDaemon(true);
                keeper.start();
            }
            return sessionId;
        }
    }

    /** The current session id, or null when there is none (never creates one). */
    public String currentSessionId() {
        synchronized (sessionLock) {
            return sessionId;
        }
    }

    public void onSessionLoss(Runnable r) {
        sessionLossListeners.add(r);
    }

    /** Declares {@code sid} lost (410 seen, or no keepalive succeeded for a whole TTL). */
    public void sessionLost(String sid, String why) {
        synchronized (sessionLock) {
            if (sid == null || !sid.equals(sessionId)) {
                return;
            }
            sessionId = null;
        }
        LOG.warn("statestore session {} lost: {}", sid, why);
        for (Runnable r : sessionLossListeners) {
            try {
                r.run();
            } catch (Throwable t) {
                LOG.error("session loss listener failed", t);
            }
        }
    }

    private void keepAliveLoop() {
        long period = Math.max(200, ttlSeconds * 1000L / 3);
        while (!closed) {
            String sid;
            long lastOk;
            synchronized (sessionLock) {
                sid = sessionId;
                lastOk = lastKeepaliveOkNanos;
            }
            long sinceOk = (System.nanoTime() - lastOk) / 1_000_000L;
            if (sid != null) {
                if (sinceOk >= ttlSeconds * 1000L) {
                    // e.g. the process was stopped: the lease is gone by now, whatever the server says later
                    sessionLost(sid, "no keepalive succeeded for " + sinceOk + " ms (ttl " + ttlSeconds + " s)");
                    continue;
                }
                try {
                    Resp r = once("POST", "/v1/sessions/" + enc(sid) + "/keepalive", null, null,
                            Duration.ofMillis(Math.max(500, ttlSeconds * 1000L - sinceOk)));
                    if (r.status == 200) {
                        synchronized (sessionLock) {
                            if (sid.equals(sessionId)) {
                                lastKeepaliveOkNanos = System.nanoTime();
                            }
                        }
                    } else if (r.status == 410 || r.status == 404 || r.status == 403) {
                        sessionLost(sid, "keepalive answered " + r);
                        continue;
                    } else {
                        LOG.warn("statestore keepalive answered {}", r);
                        sleepQuietly(Math.min(period, 500));
                        continue;
                    }
                } catch (IOException e) {
                    LOG.warn("statestore keepalive failed: {}", e.toString());
                    sleepQuietly(Math.min(period, 500));
                    continue;
                } catch (InterruptedException e) {
                    return;
                }
            }
            sleepQuietly(period);
        }
    }

    // ------------------------------------------------------------------ fencing

    public void setFencingToken(Long t) {
        fencingToken = t;
    }

    /** The fencing token every write carries: the one of the leadership this process holds or last held. */
    public String fencingHeader() {
        Long t = fencingToken;
        if (t == null) {
            throw new IllegalStateException("this JobManager never held leadership; refusing an unfenced write");
        }
        return Long.toString(t);
    }

    // ------------------------------------------------------------------ leader watch

    /** Registers a listener of leadership changes (called from the watch thread; null = nobody leads). */
    public void addLeaderListener(Consumer<LeaderState> l) {
        synchronized (this) {
            leaderListeners.add(l);
            if (watcher == null) {
                watcher = new Thread(this::watchLoop, "statestore-leader-watch");
                watcher.setDaemon(true);
                watcher.start();
            } else if (leaderKnown) {
                // never call back inside the caller's registration (Flink ignores notifications
                // that arrive before its start() returns): deliver in order on the dispatch thread
                LeaderState s = lastLeader;
                dispatch.execute(() -> deliver(l, s));
            }
        }
    }

    private final java.util.concurrent.ExecutorService dispatch =
            java.util.concurrent.Executors.newSingleThreadExecutor(r -> {
                Thread t = new Thread(r, "statestore-leader-dispatch");
                t.setDaemon(true);
                return t;
            });

    private void deliver(Consumer<LeaderState> l, LeaderState s) {
        if (!leaderListeners.contains(l)) {
            return;
        }
        try {
            l.accept(s);
        } catch (Throwable t) {
            LOG.error("leader listener failed", t);
        }
    }

    public void removeLeaderListener(Consumer<LeaderState> l) {
        leaderListeners.remove(l);
    }

    /** A fresh read of the namespace's leadership (null when nobody leads). */
    public LeaderState readLeader() throws IOException {
        Resp r = getLeader();
        return r.status == 404 ? null : new LeaderState(r.json());
    }

    /** GET .../leader: 200 (someone leads) or 404 (nobody does); anything else throws. */
    private Resp getLeader() throws IOException {
        Resp r = call("GET", "/leader", null, null, null);
        if (r.status != 200 && r.status != 404) {
            throw new StatestoreException("GET leader", r);
        }
        return r;
    }

    private synchronized void publish(LeaderState s) {
        if (leaderKnown && (s == null ? lastLeader == null : s.sameAs(lastLeader))) {
            return;
        }
        lastLeader = s;
        leaderKnown = true;
        for (Consumer<LeaderState> l : leaderListeners) {
            dispatch.execute(() -> deliver(l, s));
        }
    }

    /**
     * Reads the leadership, hands it to the listeners and returns the revision it was read at: GET
     * .../leader names it in its 200 answer and in its 404 problem, so watching from it sees every
     * later change once and none earlier (list-then-watch in one request).
     */
    private long readAndPublishLeader() throws IOException {
        Resp r = getLeader();
        JsonNode body = r.json();
        JsonNode revision = body.get("revision");
        if (revision == null || !revision.canConvertToLong()) {
            throw new StatestoreException("GET leader answered no revision to watch from", r);
        }
        publish(r.status == 404 ? null : new LeaderState(body));
        return revision.asLong();
    }

    private void watchLoop() {
        long rev = -1;
        long backoff = 100;
        while (!closed) {
            try {
                if (rev < 0) {
                    rev = readAndPublishLeader();
                }
                Resp r = once("GET", "/watch?kinds=leader&timeout=30&since=" + rev, null, null,
                        Duration.ofSeconds(45));
                if (r.status == 200) {
                    JsonNode body = r.json();
                    JsonNode last = null;
                    for (JsonNode ev : body.get("events")) {
                        last = ev; // kinds=leader: every event is a leader event, the newest wins
                    }
                    rev = body.get("revision").asLong();
                    if (last != null) {
                        JsonNode l = last.get("leader");
                        publish(l == null || l.isNull() ? null : new LeaderState(l));
                    }
                    backoff = 100;
                } else if (r.status == 410) {
                    rev = -1;
                } else {
                    throw new StatestoreException("watch", r);
                }
            } catch (Exception e) {
                if (closed) {
                    return;
                }
                LOG.warn("statestore leader watch failed: {}; retrying in {} ms", e.toString(), backoff);
                sleepQuietly(backoff);
                backoff = Math.min(backoff * 2, 2000);
                rev = -1;
            }
        }
    }

    // ------------------------------------------------------------------ handles

    public static String handlePath(String name) {
        return "/handles/" + enc(name);
    }

    /** Names of the handles whose name starts with {@code prefix}, and the listing's JSON. */
    public List<JsonNode> list(String prefix, boolean lock) throws IOException {
        String q = "/handles?prefix=" + enc(prefix) + (lock ? "&lock=true" : "");
        Resp r = call("GET", q, null, lock ? headers("X-Session-Id", sessionId()) : null, null);
        if (r.status == 410 && lock) {
            sessionLost(currentSessionId(), "listing answered 410");
        }
        if (r.status != 200) {
            throw new StatestoreException("list " + prefix, r);
        }
        List<JsonNode> out = new ArrayList<>();
        r.json().get("handles").forEach(out::add);
        return out;
    }

    /** The handle's JSON, or null when it does not exist. */
    public JsonNode getHandle(String name) throws IOException {
        Resp r = call("GET", handlePath(name), null, null, null);
        if (r.status == 404) {
            return null;
        }
        if (r.status != 200) {
            throw new StatestoreException("GET " + name, r);
        }
        return r.json();
    }

    /** The handle's bytes, or null when it does not exist. */
    public byte[] getState(String name) throws IOException {
        Resp r = call("GET", handlePath(name) + "/state", null, null, null);
        if (r.status == 404) {
            return null;
        }
        if (r.status != 200) {
            throw new StatestoreException("GET " + name + "/state", r);
        }
        return r.body;
    }

    /** Raises the right exception for a 410 (session gone) or 409 fenced answer, else returns. */
    void checkSessionAndFence(Resp r, String sid, String what) throws StatestoreException {
        if (r.status == 410) {
            sessionLost(sid, what + " answered 410");
            throw new StatestoreException(what + ": session expired", r);
        }
        if (r.status == 409 && "fenced".equals(r.type())) {
            LOG.warn("statestore refused {} of a deposed leader (fenced): {}", what, r);
            throw new StatestoreException(what + ": fenced (this JobManager is no longer the leader)", r);
        }
    }

    @Override
    public void close() {
        closed = true;
        String sid;
        synchronized (sessionLock) {
            sid = sessionId;
            sessionId = null;
        }
        if (sid != null) {
            try {
                once("DELETE", "/v1/sessions/" + enc(sid), null, null, Duration.ofSeconds(3));
            } catch (Exception e) {
                LOG.info("could not delete statestore session {}: {}", sid, e.toString());
            }
        }
        if (watcher != null) {
            watcher.interrupt();
        }
        dispatch.shutdownNow();
        if (keeper != null) {
            keeper.interrupt();
        }
    }
}
