// pgjdbc runner of pgguard's client compatibility matrix (PROTOCOL.md §4).
//
//   java -cp postgresql-42.7.13.jar Matrix.java url=jdbc:postgresql://127.0.0.1:PORT/app \
//        admin=jdbc:postgresql://127.0.0.1:PGPORT/app password=secret scenarios=scram,batch,...
//
// `url` is the target (PostgreSQL itself or pgguard); `admin` always reaches PostgreSQL directly
// and is used for the side effects a scenario needs from another session (NOTIFY, counting
// committed rows, pg_terminate_backend). Prints one JSON line per scenario:
//   {"scenario": NAME, "result": {...}}
// Results hold only user-visible, non-volatile values (rows, update counts, SQLSTATEs,
// notifications, copy contents) so that a direct run and a run through pgguard compare equal.
// A scenario that throws unexpectedly reports {"crash": "<exception class>: <message>"}.

import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.security.MessageDigest;
import java.sql.*;
import java.util.*;
import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.copy.CopyManager;
import org.postgresql.largeobject.LargeObject;
import org.postgresql.largeobject.LargeObjectManager;

public class Matrix {
    static final String REFUSED = "SELECT pgguard_refuse_me()";
    static Map<String, String> args = new HashMap<>();

    public static void main(String[] argv) throws Exception {
        for (String a : argv) {
            int i = a.indexOf('=');
            args.put(a.substring(0, i), a.substring(i + 1));
        }
        DriverManager.setLoginTimeout(15);
        for (String name : args.get("scenarios").split(",")) {
            Object result;
            try {
                result = run(name);
            } catch (Throwable t) {
                result = Map.of("crash", t.getClass().getName() + ": " + t.getMessage());
            }
            Map<String, Object> line = new LinkedHashMap<>();
            line.put("scenario", name);
            line.put("result", result);
            System.out.println(json(line));
            System.out.flush();
        }
    }

    static Object run(String name) throws Exception {
        switch (name) {
            case "scram": return scram();
            case "tls_prefer": return tls("channelBinding=prefer");
            case "tls_require": return tls("channelBinding=require");
            case "tls_disable": return tls("channelBinding=disable");
            case "tls_direct": return tls("sslNegotiation=direct");
            case "multi": return multi();
            case "extended_5": return extended(5);
            case "extended_0": return extended(0);
            case "batch": return batch(null);
            case "batch_error": return batch("INSERT INTO m VALUES (1, 'duplicate')");
            case "batch_refused": return batch(REFUSED);
            case "refused_in_tx": return refusedInTx();
            case "cursor": return cursor();
            case "copy": return copy();
            case "cancel": return cancel("");
            case "cancel_tls": return cancel("sslmode=require");
            case "tx": return tx();
            case "notify": return notifyScenario();
            case "lo": return largeObject();
            case "fatal": return fatal();
            case "large": return large();
            default: throw new IllegalArgumentException("unknown scenario " + name);
        }
    }

    // -- connections ----------------------------------------------------------------------------

    static Connection connect(String extra) throws SQLException {
        String url = args.get("url");
        if (extra != null && !extra.isEmpty()) url += (url.contains("?") ? "&" : "?") + extra;
        Properties p = new Properties();
        p.setProperty("user", "app");
        p.setProperty("password", args.get("password"));
        if (!url.contains("sslmode=")) p.setProperty("sslmode", "disable");
        p.setProperty("connectTimeout", "10");
        p.setProperty("socketTimeout", "60");
        return DriverManager.getConnection(url, p);
    }

    static Connection admin() throws SQLException {
        Properties p = new Properties();
        p.setProperty("user", "app");
        p.setProperty("password", args.get("password"));
        p.setProperty("sslmode", "disable");
        return DriverManager.getConnection(args.get("admin"), p);
    }

    static void resetTable() throws SQLException {
        try (Connection a = admin(); Statement s = a.createStatement()) {
            s.execute("DROP TABLE IF EXISTS m; CREATE TABLE m (id int PRIMARY KEY, v text)");
        }
    }

    static long committedRows() throws SQLException {
        try (Connection a = admin(); Statement s = a.createStatement();
             ResultSet rs = s.executeQuery("SELECT count(*) FROM m")) {
            rs.next();
            return rs.getLong(1);
        }
    }

    static String state(SQLException e) {
        return "E:" + e.getSQLState();
    }

    static List<List<Object>> rows(ResultSet rs) throws SQLException {
        List<List<Object>> out = new ArrayList<>();
        int n = rs.getMetaData().getColumnCount();
        while (rs.next()) {
            List<Object> r = new ArrayList<>();
            for (int i = 1; i <= n; i++) r.add(rs.getObject(i));
            out.add(r);
        }
        return out;
    }

    static List<List<Object>> query(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery(sql)) {
            return rows(rs);
        }
    }

    // -- scenarios ------------------------------------------------------------------------------

    static Object scram() throws Exception {
        Map<String, Object> out = new LinkedHashMap<>();
        try (Connection c = connect("ApplicationName=matrix-pgjdbc")) {
            out.put("row", query(c, "SELECT current_user, current_setting('application_name')"));
            out.put("valid", c.isValid(5)); // sends an empty Query
            out.put("after", query(c, "SELECT 1"));
        }
        return out;
    }

    static Object tls(String extra) throws Exception {
        Map<String, Object> out = new LinkedHashMap<>();
        long start = System.nanoTime();
        try (Connection c = connect("sslmode=require&" + extra)) {
            out.put("row", query(c, "SELECT 40 + 2"));
        } catch (SQLException e) {
            out.put("error", state(e));
            out.put("message", String.valueOf(e.getMessage()));
        }
        out.put("seconds", (System.nanoTime() - start) / 1e9);
        return out;
    }

    static Object multi() throws Exception {
        Map<String, Object> out = new LinkedHashMap<>();
        for (String mode : new String[] {"extended", "simple"}) {
            List<Object> results = new ArrayList<>();
            try (Connection c = connect("preferQueryMode=" + mode); Statement s = c.createStatement()) {
                // pgjdbc splits this into several Parse messages in one Sync group (extended) or
                // sends one Query (simple).
                boolean isRs = s.execute("SELECT 1 AS a; CREATE TEMP TABLE tt (i int); "
                        + "INSERT INTO tt VALUES (1), (2); SELECT 'x' AS b, 2 AS c");
                while (true) {
                    if (isRs) {
                        try (ResultSet rs = s.getResultSet()) { results.add(rows(rs)); }
                    } else {
                        int n = s.getUpdateCount();
                        if (n == -1) break;
                        results.add("count:" + n);
                    }
                    isRs = s.getMoreResults();
                }
                s.execute("");
                results.add("empty:" + s.getUpdateCount());
            }
            out.put(mode, results);
        }
        return out;
    }

    static Object extended(int threshold) throws Exception {
        Map<String, Object> out = new LinkedHashMap<>();
        try (Connection c = connect("prepareThreshold=" + threshold)) {
            List<Object> got = new ArrayList<>();
            try (PreparedStatement ps = c.prepareStatement("SELECT ?::int * 2, ?::text")) {
                for (int i = 0; i < 7; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "v" + i);
                    try (ResultSet rs = ps.executeQuery()) { got.add(rows(rs)); }
                }
            }
            out.put("rows", got);
            out.put("prepared", query(c, "SELECT name FROM pg_prepared_statements ORDER BY name"));
        }
        return out;
    }

    static Object batch(String middle) throws Exception {
        resetTable();
        Map<String, Object> out = new LinkedHashMap<>();
        try (Connection c = connect("")) {
            try (Statement s = c.createStatement()) {
                s.addBatch("INSERT INTO m VALUES (1, 'a')");
                if (middle != null) s.addBatch(middle);
                s.addBatch("INSERT INTO m VALUES (2, 'b')");
                out.put("counts", Arrays.toString(s.executeBatch()));
            } catch (BatchUpdateException e) {
                SQLException next = e.getNextException();
                out.put("error", state(next != null ? next : e));
            }
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO m VALUES (?, ?)")) {
                for (int i = 10; i < 13; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "p" + i);
                    ps.addBatch();
                }
                out.put("prepared_counts", Arrays.toString(ps.executeBatch()));
            }
            out.put("rows", query(c, "SELECT id FROM m ORDER BY id"));
        }
        out.put("committed", committedRows());
        return out;
    }

    static Object refusedInTx() throws Exception {
        resetTable();
        Map<String, Object> out = new LinkedHashMap<>();
        try (Connection c = connect("")) {
            c.setAutoCommit(false);
            try (Statement s = c.createStatement()) {
                s.executeUpdate("INSERT INTO m VALUES (1, 'lost')");
                try {
                    s.executeQuery(REFUSED).close();
                } catch (SQLException e) {
                    out.put("refused", state(e));
                }
                try {
                    s.executeQuery("SELECT 1").close();
                } catch (SQLException e) {
                    out.put("in_failed_tx", state(e));
                }
            }
            try {
                c.commit();
                out.put("commit", "ok");
            } catch (SQLException e) {
                out.put("commit", state(e));
            }
            c.setAutoCommit(true);
            out.put("usable", query(c, "SELECT 5"));
        }
        out.put("committed", committedRows());
        return out;
    }

    static Object cursor() throws Exception {
        Map<String, Object> out = new LinkedHashMap<>();
        try (Connection c = connect("")) {
            c.setAutoCommit(false); // fetchSize uses a portal only inside a transaction
            try (Statement s = c.createStatement()) {
                s.setFetchSize(10);
                long n = 0, sum = 0;
                try (ResultSet rs = s.executeQuery("SELECT g FROM generate_series(1, 45) g")) {
                    while (rs.next()) { n++; sum += rs.getLong(1); }
                }
                out.put("plain", List.of(n, sum));
            }
            try (PreparedStatement ps = c.prepareStatement(
                    "SELECT g, repeat('y', g) FROM generate_series(1, ?) g")) {
                ps.setFetchSize(7);
                ps.setInt(1, 30);
                try (ResultSet rs = ps.executeQuery()) {
                    out.put("prepared", rows(rs).size());
                }
            }
            c.commit();
        }
        return out;
    }

    static Object copy() throws Exception {
        resetTable();
        Map<String, Object> out = new LinkedHashMap<>();
        try (Connection c = connect("")) {
            CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
            StringBuilder sb = new StringBuilder();
            for (int i = 1; i <= 300; i++) sb.append(i).append("\tr").append(i).append('\n');
            out.put("in", cm.copyIn("COPY m (id, v) FROM STDIN",
                    new ByteArrayInputStream(sb.toString().getBytes("UTF-8"))));
            ByteArrayOutputStream bos = new ByteArrayOutputStream();
            out.put("out", cm.copyOut("COPY (SELECT id, v FROM m ORDER BY id) TO STDOUT", bos));
            out.put("out_md5", md5(bos.toByteArray()));
            try {
                cm.copyIn("COPY m (id, v) FROM STDIN",
                        new ByteArrayInputStream("1000\tok\nbad\tbad\n1001\tok\n".getBytes("UTF-8")));
            } catch (SQLException e) {
                out.put("bad", state(e));
            }
            out.put("after", query(c, "SELECT count(*) FROM m"));
        }
        return out;
    }

    static Object cancel(String extra) throws Exception {
        Map<String, Object> out = new LinkedHashMap<>();
        try (Connection c = connect(extra); Statement s = c.createStatement()) {
            Thread t = new Thread(() -> {
                try { Thread.sleep(500); s.cancel(); } catch (Exception ignored) { }
            });
            long start = System.nanoTime();
            t.start();
            try {
                s.execute("SELECT pg_sleep(20)");
                out.put("got", "no error");
            } catch (SQLException e) {
                out.put("got", state(e));
            }
            t.join();
            out.put("fast", (System.nanoTime() - start) / 1e9 < 10);
            out.put("after", query(c, "SELECT 1"));
        }
        return out;
    }

    static Object tx() throws Exception {
        resetTable();
        Map<String, Object> out = new LinkedHashMap<>();
        try (Connection c = connect("")) {
            c.setAutoCommit(false);
            try (Statement s = c.createStatement()) {
                s.executeUpdate("INSERT INTO m VALUES (1, 'kept')");
                c.commit();
                s.executeUpdate("INSERT INTO m VALUES (2, 'rolled back')");
                c.rollback();
                s.executeUpdate("INSERT INTO m VALUES (3, 'lost')");
                try {
                    s.executeUpdate("INSERT INTO m VALUES (1, 'dup')");
                } catch (SQLException e) {
                    out.put("dup", state(e));
                }
                try {
                    c.commit();
                    out.put("commit_after_error", "ok");
                } catch (SQLException e) {
                    out.put("commit_after_error", state(e));
                }
            }
            c.setAutoCommit(true);
            try (Statement s = c.createStatement()) {
                s.execute("BEGIN");
                s.execute("INSERT INTO m VALUES (4, 'lost')");
                try { s.execute("SELECT 1/0"); } catch (SQLException e) { out.put("div", state(e)); }
                s.execute("COMMIT");
                out.put("manual_commit_count", s.getUpdateCount());
            }
            out.put("rows", query(c, "SELECT id, v FROM m ORDER BY id"));
        }
        return out;
    }

    static Object notifyScenario() throws Exception {
        List<String> got = new ArrayList<>();
        try (Connection c = connect(""); Connection other = admin();
             Statement s = c.createStatement(); Statement o = other.createStatement()) {
            s.execute("LISTEN matrix_chan");
            o.execute("NOTIFY matrix_chan, 'idle'");
            collect(c, got, 1);
            c.setAutoCommit(false);
            s.execute("NOTIFY matrix_chan, 'own, in tx'");
            o.execute("NOTIFY matrix_chan, 'other, while listener in tx'");
            c.commit();
            collect(c, got, 3);
        }
        Collections.sort(got);
        return Map.of("notifications", got);
    }

    static void collect(Connection c, List<String> got, int want) throws SQLException {
        long deadline = System.currentTimeMillis() + 10000;
        while (got.size() < want && System.currentTimeMillis() < deadline) {
            PGNotification[] ns = c.unwrap(PGConnection.class).getNotifications(1000);
            if (ns != null) for (PGNotification n : ns) got.add(n.getName() + ":" + n.getParameter());
        }
    }

    static Object largeObject() throws Exception {
        Map<String, Object> out = new LinkedHashMap<>();
        try (Connection c = connect("")) {
            c.setAutoCommit(false);
            try {
                LargeObjectManager lom = c.unwrap(PGConnection.class).getLargeObjectAPI();
                long oid = lom.createLO(LargeObjectManager.READWRITE); // FunctionCall lo_creat
                try (LargeObject lo = lom.open(oid, LargeObjectManager.READWRITE)) {
                    lo.write("hello".getBytes("UTF-8"));
                }
                lom.delete(oid);
                out.put("lo", "ok");
            } catch (SQLException e) {
                out.put("lo", state(e));
            }
            c.rollback();
            c.setAutoCommit(true);
            out.put("usable", query(c, "SELECT 6"));
        }
        return out;
    }

    static Object fatal() throws Exception {
        Map<String, Object> out = new LinkedHashMap<>();
        try (Connection c = connect("ApplicationName=matrix-fatal-pgjdbc")) {
            query(c, "SELECT 1");
            try (Connection a = admin()) {
                out.put("killed", query(a, "SELECT count(pg_terminate_backend(pid)) FROM "
                        + "pg_stat_activity WHERE application_name = 'matrix-fatal-pgjdbc'"));
            }
            Thread.sleep(300);
            try {
                query(c, "SELECT 1");
                out.put("error", "none");
            } catch (SQLException e) {
                out.put("error", state(e));
            }
            out.put("closed", c.isClosed() || !c.isValid(2));
        }
        return out;
    }

    static Object large() throws Exception {
        Map<String, Object> out = new LinkedHashMap<>();
        try (Connection c = connect("")) {
            long n = 0, sum = 0;
            try (Statement s = c.createStatement();
                 ResultSet rs = s.executeQuery("SELECT g, 'row ' || g FROM generate_series(1, 1000000) g")) {
                while (rs.next()) { n++; sum += rs.getLong(1); }
            }
            out.put("rows", List.of(n, sum));
            byte[] blob = new byte[50 * 1024 * 1024];
            for (int i = 0; i < blob.length; i++) blob[i] = (byte) i;
            try (PreparedStatement ps = c.prepareStatement(
                    "SELECT length(b), md5(b) FROM (SELECT ?::bytea AS b) s")) {
                ps.setBytes(1, blob);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    out.put("bind", List.of(rs.getLong(1), rs.getString(2).equals(md5(blob))));
                }
            }
            String big = "x".repeat(20 * 1024 * 1024);
            out.put("query", query(c, "SELECT length('" + big + "')"));
        }
        return out;
    }

    // -- small utilities ------------------------------------------------------------------------

    static String md5(byte[] data) throws Exception {
        StringBuilder sb = new StringBuilder();
        for (byte b : MessageDigest.getInstance("MD5").digest(data)) sb.append(String.format("%02x", b));
        return sb.toString();
    }

    static String json(Object v) {
        if (v == null) return "null";
        if (v instanceof String) {
            StringBuilder sb = new StringBuilder("\"");
            for (char ch : ((String) v).toCharArray()) {
                if (ch == '"' || ch == '\\') sb.append('\\').append(ch);
                else if (ch < 0x20) sb.append(String.format("\\u%04x", (int) ch));
                else sb.append(ch);
            }
            return sb.append('"').toString();
        }
        if (v instanceof Boolean || v instanceof Integer || v instanceof Long) return v.toString();
        if (v instanceof Number) return v.toString();
        if (v instanceof Map) {
            StringJoiner j = new StringJoiner(",", "{", "}");
            for (Map.Entry<?, ?> e : ((Map<?, ?>) v).entrySet())
                j.add(json(String.valueOf(e.getKey())) + ":" + json(e.getValue()));
            return j.toString();
        }
        if (v instanceof Collection) {
            StringJoiner j = new StringJoiner(",", "[", "]");
            for (Object o : (Collection<?>) v) j.add(json(o));
            return j.toString();
        }
        return json(v.toString());
    }
}
