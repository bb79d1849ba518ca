package io.statestore.flink;

import org.apache.flink.configuration.ConfigOption;
import org.apache.flink.configuration.ConfigOptions;
import org.apache.flink.configuration.Configuration;
import org.apache.flink.configuration.HighAvailabilityOptions;

import java.time.Duration;

/** The {@code high-availability.statestore.*} keys (documented in integrations/flink/README.md). */
public final class StatestoreHaOptions {

    public static final ConfigOption<String> URL =
            ConfigOptions.key("high-availability.statestore.url")
                    .stringType()
                    .noDefaultValue()
                    .withDescription("Base URL of the statestore REST API, e.g. http://statestore:8080.");

    public static final ConfigOption<String> TOKEN =
            ConfigOptions.key("high-availability.statestore.token")
                    .stringType()
                    .noDefaultValue()
                    .withDescription("Bearer token (write role on the namespace). Unset when auth is off.");

    public static final ConfigOption<String> NAMESPACE =
            ConfigOptions.key("high-availability.statestore.namespace")
                    .stringType()
                    .noDefaultValue()
                    .withDescription("statestore namespace of this cluster; defaults to high-availability.cluster-id.");

    public static final ConfigOption<Duration> SESSION_TTL =
            ConfigOptions.key("high-availability.statestore.session-ttl")
                    .durationType()
                    .defaultValue(Duration.ofSeconds(10))
                    .withDescription("TTL of the JobManager's statestore session; kept alive every TTL/3. "
                            + "Its loss revokes leadership.");

    public static final ConfigOption<Duration> RETRY_TIMEOUT =
            ConfigOptions.key("high-availability.statestore.retry-timeout")
                    .durationType()
                    .defaultValue(Duration.ofSeconds(30))
                    .withDescription("How long one call is retried (with backoff) while statestore is unreachable.");

    public static final ConfigOption<Duration> REQUEST_TIMEOUT =
            ConfigOptions.key("high-availability.statestore.request-timeout")
                    .durationType()
                    .defaultValue(Duration.ofSeconds(10))
                    .withDescription("Timeout of one HTTP request (watches add their long-poll time).");

    static String namespace(Configuration conf) {
        String ns = conf.get(NAMESPACE);
        if (ns == null || ns.isEmpty()) {
            ns = conf.get(HighAvailabilityOptions.HA_CLUSTER_ID);
        }
        return ns;
    }

    private StatestoreHaOptions() {}
}
