// pgjdbc as DBeaver drives it, for tests/integration/test_stepup_clients.py: unnamed statements
// (prepareThreshold=0), Execute with maxrows (setMaxRows(200) in autocommit; setFetchSize(50)
// in a transaction, which suspends the portal and Executes it again). Prints one JSON line per
// step; the test steps up in between.
//   java -cp postgresql.jar StepUpClient.java URL PASSWORD
import java.sql.*;
import java.util.Properties;

public class StepUpClient {
    static void result(String step, Statement st, ResultSet rs) throws SQLException {
        int n = 0, first = -1, last = -1;
        String lastEmail = "";
        while (rs.next()) {
            if (n == 0) first = rs.getInt(1);
            last = rs.getInt(1);
            lastEmail = rs.getString(2);
            n++;
        }
        SQLWarning w = st.getWarnings();
        String warn = w == null ? "" : w.getSQLState() + " " + w.getMessage().replace("\"", "'");
        System.out.println("{\"step\":\"" + step + "\",\"rows\":" + n + ",\"first\":" + first
                + ",\"last\":" + last + ",\"last_email\":\"" + lastEmail + "\",\"warning\":\""
                + warn.replace("\n", " ") + "\"}");
        System.out.flush();
    }

    public static void main(String[] a) throws Exception {
        Properties p = new Properties();
        p.setProperty("user", "app");
        p.setProperty("password", a[1]);
        p.setProperty("prepareThreshold", "0");
        p.setProperty("sslmode", "disable");
        p.setProperty("ApplicationName", "DBeaver-like");
        String sql = "SELECT id, email FROM su_big ORDER BY id";
        try (Connection c = DriverManager.getConnection(a[0], p)) {
            try (Statement s = c.createStatement();
                 ResultSet rs = s.executeQuery("SHOW pgguard.session_id")) {
                rs.next();
                System.out.println("{\"step\":\"session\",\"session\":\"" + rs.getString(1) + "\"}");
                System.out.flush();
            }
            try (PreparedStatement ps = c.prepareStatement(sql)) {
                ps.setMaxRows(200);
                result("maxrows", ps, ps.executeQuery());
            }
            c.setAutoCommit(false);
            try (PreparedStatement ps = c.prepareStatement(sql)) {
                ps.setFetchSize(50);
                result("fetchsize", ps, ps.executeQuery());
            }
            c.commit();
            try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("SELECT 1")) {
                rs.next();
                System.out.println("{\"step\":\"done\",\"after\":" + rs.getInt(1) + "}");
            }
        } catch (SQLException e) {
            System.out.println("{\"step\":\"error\",\"sqlstate\":\"" + e.getSQLState() + "\"}");
        }
    }
}
