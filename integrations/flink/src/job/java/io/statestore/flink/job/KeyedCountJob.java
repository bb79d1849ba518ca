package io.statestore.flink.job;

import org.apache.flink.api.common.functions.MapFunction;
import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.api.java.functions.KeySelector;
import org.apache.flink.util.ParameterTool;
import org.apache.flink.streaming.api.environment.StreamExecutionEnvironment;
import org.apache.flink.streaming.api.functions.KeyedProcessFunction;
import org.apache.flink.streaming.api.functions.sink.v2.DiscardingSink;
import org.apache.flink.util.Collector;

import java.io.FileWriter;
import java.io.IOException;

/**
 * The end-to-end tests' stateful job: numbers 0, 1, 2, ... (the source's position is checkpointed),
 * keyed by n % keys, each key counting its numbers in keyed state. Every record appends
 * "n,key,count" to the output file, so state continuity is visible: for every n, count == n / keys + 1,
 * whatever failovers happened (a lost count restarts at 1, a doubled one runs ahead).
 */
public final class KeyedCountJob {

    public static void main(String[] args) throws Exception {
        ParameterTool p = ParameterTool.fromArgs(args);
        String out = p.getRequired("out");
        long delayMs = p.getLong("delay-ms", 20);
        long keys = p.getLong("keys", 3);
        long max = p.getLong("max", Long.MAX_VALUE - 1);

        StreamExecutionEnvironment env = StreamExecutionEnvironment.getExecutionEnvironment();
        env.enableCheckpointing(p.getLong("checkpoint-ms", 1000));
        env.setParallelism(1);
        env.fromSequence(0, max)
                .map(new Throttle(delayMs))
                .keyBy(new ByKey(keys))
                .process(new Count(out))
                .sinkTo(new DiscardingSink<>());
        env.execute(p.get("name", "statestore-keyed-count"));
    }

    static final class Throttle implements MapFunction<Long, Long> {
        private final long delayMs;

        Throttle(long delayMs) {
            this.delayMs = delayMs;
        }

        @Override
        public Long map(Long n) throws Exception {
            Thread.sleep(delayMs);
            return n;
        }
    }

    static final class ByKey implements KeySelector<Long, Long> {
        private final long keys;

        ByKey(long keys) {
            this.keys = keys;
        }

        @Override
        public Long getKey(Long n) {
            return n % keys;
        }
    }

    static final class Count extends KeyedProcessFunction<Long, Long, String> {
        private final String out;
        private transient ValueState<Long> count;
        private transient FileWriter writer;

        Count(String out) {
            this.out = out;
        }

        @Override
        public void open(OpenContext ctx) throws IOException {
            count = getRuntimeContext().getState(new ValueStateDescriptor<>("count", Long.class));
            writer = new FileWriter(out, true);
        }

        @Override
        public void processElement(Long n, Context ctx, Collector<String> collector) throws Exception {
            Long c = count.value();
            long next = (c == null ? 0 : c) + 1;
            count.update(next);
            String line = n + "," + ctx.getCurrentKey() + "," + next;
            writer.write(line + "\n");
            writer.flush();
            collector.collect(line);
        }

        @Override
        public void close() throws IOException {
            if (writer != null) {
                writer.close();
            }
        }
    }
}
