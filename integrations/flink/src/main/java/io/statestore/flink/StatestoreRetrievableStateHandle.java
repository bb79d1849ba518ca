package io.statestore.flink;

import org.apache.flink.util.InstantiationUtil;

import java.io.IOException;
import java.io.Serializable;

/**
 * A state object kept as a statestore handle's blob. The blob is the serialized object itself, so
 * there is no second file to discard: removing the handle reclaims it.
 */
public final class StatestoreRetrievableStateHandle<T extends Serializable>
        implements org.apache.flink.runtime.state.RetrievableStateHandle<T> {
    private static final long serialVersionUID = 1L;

    private final String name;
    private final byte[] bytes;
    private transient T state;

    StatestoreRetrievableStateHandle(String name, byte[] bytes, T state) {
        this.name = name;
        this.bytes = bytes;
        this.state = state;
    }

    @Override
    @SuppressWarnings("unchecked")
    public T retrieveState() throws IOException, ClassNotFoundException {
        if (state == null) {
            state = (T) InstantiationUtil.deserializeObject(bytes, Thread.currentThread().getContextClassLoader());
        }
        return state;
    }

    /** Nothing to do: the statestore handle's removal deletes the blob. */
    @Override
    public void discardState() {}

    @Override
    public long getStateSize() {
        return bytes.length;
    }

    @Override
    public String toString() {
        return "StatestoreRetrievableStateHandle{" + name + ", " + bytes.length + " bytes}";
    }
}
