package io.statestore.flink;

import io.statestore.flink.StatestoreClient.Resp;
import io.statestore.flink.StatestoreClient.StatestoreException;

import org.apache.flink.api.common.ApplicationID;
import org.apache.flink.api.common.JobID;
import org.apache.flink.runtime.highavailability.AbstractThreadsafeApplicationResultStore;
import org.apache.flink.runtime.highavailability.AbstractThreadsafeJobResultStore;
import org.apache.flink.runtime.highavailability.ApplicationResult;
import org.apache.flink.runtime.highavailability.ApplicationResultEntry;
import org.apache.flink.runtime.highavailability.JobResultEntry;
import org.apache.flink.runtime.jobmaster.JobResult;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.JsonNode;
import org.apache.flink.util.InstantiationUtil;

import java.io.IOException;
import java.io.Serializable;
import java.util.HashSet;
import java.util.NoSuchElementException;
import java.util.Set;
import java.util.UUID;
import java.util.concurrent.Executor;

/**
 * Job and application result stores over handles {@code job-results/<id>} and
 * {@code application-results/<id>}: the blob is the serialized result, the metadata says
 * {@code dirty} or {@code clean}. Marking clean removes the handle when delete-on-commit is on
 * (Flink's default), else rewrites it as clean.
 */
final class StatestoreResultStores {

    private StatestoreResultStores() {}

    /** The shared handle logic; {@code prefix} ends with '/'. */
    static final class Entries {
        private final StatestoreClient client;
        private final String prefix;
        private final boolean deleteOnCommit;

        Entries(StatestoreClient client, String prefix, boolean deleteOnCommit) {
            this.client = client;
            this.prefix = prefix;
            this.deleteOnCommit = deleteOnCommit;
        }

        private static String meta(String state) {
            return "{\"flink\":\"result\",\"state\":\"" + state + "\"}";
        }

        void put(String id, Serializable result, String state, Long ifMatch) throws IOException {
            byte[] bytes = InstantiationUtil.serializeObject(result);
            String name = prefix + id;
            String sid = client.sessionId();
            Resp r = client.call("PUT", StatestoreClient.handlePath(name), bytes,
                    StatestoreClient.headers("X-Session-Id", sid, "X-Fencing-Token", client.fencingHeader(),
                            "X-Handle-Metadata", meta(state), "X-Content-SHA256", StatestoreClient.sha256(bytes),
                            "If-Match", ifMatch == null ? null : "\"" + ifMatch + "\"",
                            "Idempotency-Key", UUID.randomUUID().toString(),
                            "Content-Type", "application/octet-stream"), null);
            client.checkSessionAndFence(r, sid, "put " + name);
            if (r.status == 201 || r.status == 200) {
                // a result entry needs no lock of this JobManager: release it so a successor may remove it
                client.call("DELETE", StatestoreClient.handlePath(name) + "/lock", null,
                        StatestoreClient.headers("X-Session-Id", sid), null);
                return;
            }
            if (r.status == 409 && "already-exists".equals(r.type())) {
                throw new IllegalStateException("a result entry for " + id + " exists already");
            }
            throw new StatestoreException("put " + name, r);
        }

        String state(String id) throws IOException {
            JsonNode h = client.getHandle(prefix + id);
            return h == null ? null : h.path("metadata").path("state").asText(null);
        }

        void markClean(String id, Serializable cleanResult) throws IOException {
            String name = prefix + id;
            JsonNode h = client.getHandle(name);
            if (h == null || !"dirty".equals(h.path("metadata").path("state").asText())) {
                throw new NoSuchElementException("no dirty result entry for " + id);
            }
            if (deleteOnCommit) {
                String sid = client.sessionId();
                Resp r = client.call("DELETE", StatestoreClient.handlePath(name), null,
                        StatestoreClient.headers("X-Session-Id", sid, "X-Fencing-Token", client.fencingHeader()),
                        null);
                client.checkSessionAndFence(r, sid, "remove " + name);
                if (r.status != 204 && r.status != 200) {
                    throw new StatestoreException("remove " + name, r);
                }
            } else {
                put(id, cleanResult, "clean", h.get("version").asLong());
            }
        }

        Set<Object> dirty() throws IOException {
            Set<Object> out = new HashSet<>();
            for (JsonNode h : client.list(prefix, false)) {
                if (!"dirty".equals(h.path("metadata").path("state").asText())) {
                    continue;
                }
                byte[] bytes = client.getState(h.get("name").asText());
                if (bytes != null) {
                    out.add(deserialize(bytes));
                }
            }
            return out;
        }

        Object read(String id) throws IOException {
            byte[] bytes = client.getState(prefix + id);
            return bytes == null ? null : deserialize(bytes);
        }

        private static Object deserialize(byte[] bytes) throws IOException {
            try {
                return InstantiationUtil.deserializeObject(bytes, StatestoreResultStores.class.getClassLoader());
            } catch (ClassNotFoundException e) {
                throw new IOException(e);
            }
        }
    }

    /** Flink's JobResultStore. */
    static final class Jobs extends AbstractThreadsafeJobResultStore {
        private final Entries entries;

        Jobs(StatestoreClient client, boolean deleteOnCommit, Executor ioExecutor) {
            super(ioExecutor);
            this.entries = new Entries(client, "job-results/", deleteOnCommit);
        }

        @Override
        protected void createDirtyResultInternal(JobResultEntry entry) throws IOException {
            entries.put(entry.getJobId().toString(), entry.getJobResult(), "dirty", null);
        }

        @Override
        protected void markResultAsCleanInternal(JobID jobId) throws IOException {
            Object result = entries.read(jobId.toString());
            entries.markClean(jobId.toString(), (Serializable) result);
        }

        @Override
        protected boolean hasDirtyJobResultEntryInternal(JobID jobId) throws IOException {
            return "dirty".equals(entries.state(jobId.toString()));
        }

        @Override
        protected boolean hasCleanJobResultEntryInternal(JobID jobId) throws IOException {
            return "clean".equals(entries.state(jobId.toString()));
        }

        @Override
        protected Set<JobResult> getDirtyResultsInternal() throws IOException {
            Set<JobResult> out = new HashSet<>();
            for (Object o : entries.dirty()) {
                out.add((JobResult) o);
            }
            return out;
        }
    }

    /** Flink's ApplicationResultStore. */
    static final class Applications extends AbstractThreadsafeApplicationResultStore {
        private final Entries entries;

        Applications(StatestoreClient client, boolean deleteOnCommit, Executor ioExecutor) {
            super(ioExecutor);
            this.entries = new Entries(client, "application-results/", deleteOnCommit);
        }

        @Override
        protected void createDirtyResultInternal(ApplicationResultEntry entry) throws IOException {
            entries.put(entry.getApplicationId().toString(), entry.getApplicationResult(), "dirty", null);
        }

        @Override
        protected void markResultAsCleanInternal(ApplicationID id) throws IOException {
            Object result = entries.read(id.toString());
            entries.markClean(id.toString(), (Serializable) result);
        }

        @Override
        protected boolean hasDirtyApplicationResultEntryInternal(ApplicationID id) throws IOException {
            return "dirty".equals(entries.state(id.toString()));
        }

        @Override
        protected boolean hasCleanApplicationResultEntryInternal(ApplicationID id) throws IOException {
            return "clean".equals(entries.state(id.toString()));
        }

        @Override
        protected Set<ApplicationResult> getDirtyResultsInternal() throws IOException {
            Set<ApplicationResult> out = new HashSet<>();
            for (Object o : entries.dirty()) {
                out.add((ApplicationResult) o);
            }
            return out;
        }

        @Override
        protected ApplicationResult getCleanApplicationResultInternal(ApplicationID id) throws IOException {
            return "clean".equals(entries.state(id.toString())) ? (ApplicationResult) entries.read(id.toString()) : null;
        }
    }
}
