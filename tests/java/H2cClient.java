// A job manager's HTTP client as Java ships it: java.net.http.HttpClient with
// default settings, which asks for HTTP/2 and so sends "Upgrade: h2c" on every
// cleartext request. Run as a single-file program:
//
//   java H2cClient.java <base url> <namespace> <count>
//
// Creates <count> sessions and PUTs one handle per session; prints one line
// per request ("session <status> <body>", "put <status> <body>") and exits 1
// on the first unexpected status.
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;

public class H2cClient {
    public static void main(String[] args) throws Exception {
        String base = args[0];
        String ns = args[1];
        int count = Integer.parseInt(args[2]);
        HttpClient client = HttpClient.newHttpClient();  // defaults: HTTP/2 preferred
        for (int i = 0; i < count; i++) {
            String body = "{\"ttl_seconds\": " + (20 + i) + ", \"owner\": \"java-" + i + "\"}";
            HttpResponse<String> r = client.send(
                HttpRequest.newBuilder(URI.create(base + "/v1/sessions"))
                    .header("Content-Type", "application/json")
                    .POST(HttpRequest.BodyPublishers.ofString(body))
                    .build(),
                HttpResponse.BodyHandlers.ofString());
            System.out.println("session " + r.statusCode() + " " + r.version() + " " + r.body());
            if (r.statusCode() != 201) System.exit(1);
            String sid = r.body().replaceAll(".*\"session_id\":\"([^\"]+)\".*", "$1");
            HttpResponse<String> p = client.send(
                HttpRequest.newBuilder(URI.create(base + "/v1/namespaces/" + ns + "/handles/java-" + i))
                    .header("X-Session-Id", sid)
                    .PUT(HttpRequest.BodyPublishers.ofString("java state " + i))
                    .build(),
                HttpResponse.BodyHandlers.ofString());
            System.out.println("put " + p.statusCode() + " " + p.version() + " " + p.body());
            if (p.statusCode() != 201) System.exit(1);
        }
    }
}
