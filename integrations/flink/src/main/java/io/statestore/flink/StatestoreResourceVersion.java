package io.statestore.flink;

import org.apache.flink.runtime.persistence.ResourceVersion;

/** A handle's statestore {@code version}; -1 when the handle does not exist. */
public final class StatestoreResourceVersion implements ResourceVersion<StatestoreResourceVersion> {
    private static final long serialVersionUID = 1L;
    public static final StatestoreResourceVersion NOT_EXISTING = new StatestoreResourceVersion(-1);

    private final long version;

    public StatestoreResourceVersion(long version) {
        this.version = version;
    }

    public long value() {
        return version;
    }

    @Override
    public boolean isExisting() {
        return version >= 0;
    }

    @Override
    public int compareTo(StatestoreResourceVersion o) {
        return Long.compare(version, o.version);
    }

    @Override
    public boolean equals(Object o) {
        return o instanceof StatestoreResourceVersion && ((StatestoreResourceVersion) o).version == version;
    }

    @Override
    public int hashCode() {
        return Long.hashCode(version);
    }

    @Override
    public String toString() {
        return "StatestoreResourceVersion{" + version + "}";
    }
}
