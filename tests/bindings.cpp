// Section 13 (directory), the bindings file: its syntax, every kind of error
// with the file name and the line it is on, the table's capacity (exactly
// LEMSG_DIR_MAX_BINDINGS, in both the ordinary and the tiny build), all or
// nothing, user names from a passwd file of the test's own (LEMSG_PASSWD),
// find(), and load() with files that are missing or too large.
#define DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS
#include <doctest/doctest.h>
#include "lemsg.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

using lemsg::Binding;
using lemsg::Bindings;
using lemsg::Result;

namespace {

/// Sets environment variable `name` while it lives, then puts back what was
/// there (or unsets it).
struct EnvOverride {
  const char* name;
  char old[512] = {};
  bool had = false;
  EnvOverride(const char* n, const char* value) : name(n) {
    if (const char* o = std::getenv(n)) {
      had = true;
      std::snprintf(old, sizeof old, "%s", o);
    }
    setenv(n, value, 1);
  }
  ~EnvOverride() {
    if (had)
      setenv(name, old, 1);
    else
      unsetenv(name);
  }
  EnvOverride(const EnvOverride&) = delete;
  EnvOverride& operator=(const EnvOverride&) = delete;
};

/// A file under /tmp holding `len` bytes of `text`, removed when it goes.
struct TempFile {
  char path[64];
  TempFile(const char* text, std::size_t len) {
    std::snprintf(path, sizeof path, "/tmp/lemsg-bind-XXXXXX");
    const int fd = mkstemp(path);
    if (fd < 0) std::abort();
    std::size_t done = 0;
    while (done < len) {
      const ssize_t w = write(fd, text + done, len - done);
      if (w <= 0) std::abort();
      done += static_cast<std::size_t>(w);
    }
    close(fd);
  }
  explicit TempFile(const char* text) : TempFile(text, std::strlen(text)) {}
  ~TempFile() { unlink(path); }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
};

// The users of the tests' passwd file. Two lines are traps: a NIS "+" line
// and a line whose gecos field is far longer than the parser's line buffer.
const char kPasswd[] =
    "root:x:0:0:root:/root:/bin/bash\n"
    "+nis::::::\n"
    "modem:x:1001:1001::/home/modem:/usr/sbin/nologin\n"
    "ui:x:1002:1002:The UI, "
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
    ":/home/ui:/bin/sh\n"
    "badnum:x:12a:1::/:/bin/sh\n"
    "logger:x:1003:1003::/home/logger:/usr/sbin/nologin\n"
    "twin:x:1001:1001::/:/bin/sh\n"
    "a-very-long-user-name-for-a-small-buffer:x:1004:1004::/:/bin/sh\n"
    "last:x:1005:1005::/:/bin/sh";  // no newline at the end

/// The tests' passwd file, installed as LEMSG_PASSWD while it lives.
struct Passwd {
  TempFile file{kPasswd};
  EnvOverride env{"LEMSG_PASSWD", file.path};
};

/// Parses `text` into `b` with file name "bf"; the message goes to `err`.
Result parse(Bindings& b, const char* text, char (&err)[256]) {
  return b.parse(text, std::strlen(text), "bf", err, sizeof err);
}

/// Appends to `buf` (capacity `cap`, `len` used so far) like snprintf.
void append(char* buf, std::size_t cap, std::size_t& len, const char* fmt, int a, int b) {
  const int w = std::snprintf(buf + len, cap - len, fmt, a, b);
  REQUIRE(w > 0);
  REQUIRE(len + static_cast<std::size_t>(w) < cap);
  len += static_cast<std::size_t>(w);
}

// A table big enough for n bindings with a comment line between each two:
// binding i is "<1000+i>.if<i> -> 0.svc" on line 2i + 1.
constexpr std::size_t kBigText = 64 * (LEMSG_DIR_MAX_BINDINGS + 2) + 64;
std::size_t make_table(char (&buf)[kBigText], int n) {
  std::size_t len = 0;
  buf[0] = '\0';
  for (int i = 0; i < n; ++i) {
    append(buf, sizeof buf, len, "%d.if%d -> 0.svc\n", 1000 + i, i);
    append(buf, sizeof buf, len, "# after %d of %d\n", i + 1, n);
  }
  return len;
}

}  // namespace

TEST_SUITE("directory") {

TEST_CASE("bindings: a good file with comments, blank lines, CRLF and both kinds of user parses") {
  Passwd pw;
  static Bindings b;
  char err[256];
  const char text[] =
      "# the modem's clients\r\n"
      "\r\n"
      "   ui.modem -> modem.modem   # the UI\r\n"
      "logger.modem->modem.modem\n"
      "\t1003.log\t->\t0.system-log_2 \n"
      "  \t  \n"
      "#ui.other -> modem.modem\n"
      "last.a.b.c -> 4294967294.x-y_z.v2";  // no newline at the end
  REQUIRE(parse(b, text, err) == Result::Ok);
  CHECK(err[0] == '\0');
  REQUIRE(b.size() == 4);

  CHECK(b[0].client_uid == 1002);
  CHECK(std::strcmp(b[0].iface, "modem") == 0);
  CHECK(b[0].server_uid == 1001);
  CHECK(std::strcmp(b[0].service, "modem") == 0);
  CHECK(b[0].line == 3);

  CHECK(b[1].client_uid == 1003);
  CHECK(std::strcmp(b[1].iface, "modem") == 0);
  CHECK(b[1].line == 4);

  CHECK(b[2].client_uid == 1003);
  CHECK(std::strcmp(b[2].iface, "log") == 0);
  CHECK(b[2].server_uid == 0);
  CHECK(std::strcmp(b[2].service, "system-log_2") == 0);
  CHECK(b[2].line == 5);

  // The user ends at the first '.': the name keeps the others.
  CHECK(b[3].client_uid == 1005);
  CHECK(std::strcmp(b[3].iface, "a.b.c") == 0);
  CHECK(b[3].server_uid == 4294967294u);
  CHECK(std::strcmp(b[3].service, "x-y_z.v2") == 0);
  CHECK(b[3].line == 8);

  // An empty file, or one of comments only, is a good file with no bindings.
  REQUIRE(parse(b, "# nothing bound yet\n\n", err) == Result::Ok);
  CHECK(b.size() == 0);
  REQUIRE(b.parse(nullptr, 0, "bf", err, sizeof err) == Result::Ok);
  CHECK(b.size() == 0);
}

TEST_CASE("bindings: find() looks a binding up by client uid and interface") {
  Passwd pw;
  static Bindings b;
  char err[256];
  REQUIRE(parse(b,
                "ui.modem -> modem.modem\n"
                "logger.modem -> modem.modem\n"
                "ui.log -> logger.log\n",
                err) == Result::Ok);
  const Binding* f = b.find(1002, "modem");
  REQUIRE(f != nullptr);
  CHECK(f->line == 1);
  CHECK(f->server_uid == 1001);
  f = b.find(1003, "modem");
  REQUIRE(f != nullptr);
  CHECK(f->line == 2);
  f = b.find(1002, "log");
  REQUIRE(f != nullptr);
  CHECK(f->server_uid == 1003);
  CHECK(std::strcmp(f->service, "log") == 0);
  // Another uid, another interface, a prefix, nothing: not bound.
  CHECK(b.find(1003, "log") == nullptr);
  CHECK(b.find(1001, "modem") == nullptr);
  CHECK(b.find(1002, "mode") == nullptr);
  CHECK(b.find(1002, "modem2") == nullptr);
  CHECK(b.find(1002, "") == nullptr);
  CHECK(b.find(1002, nullptr) == nullptr);
}

TEST_CASE("bindings: each kind of error names the file and its line") {
  Passwd pw;
  char long_name[LEMSG_MAX_NAME + 2];
  std::memset(long_name, 'n', LEMSG_MAX_NAME + 1);
  long_name[LEMSG_MAX_NAME + 1] = '\0';
  char longest[LEMSG_MAX_NAME + 1];
  std::memset(longest, 'n', LEMSG_MAX_NAME);
  longest[LEMSG_MAX_NAME] = '\0';

  struct Case {
    const char* bad_line;  // written from line 3, after a comment and a good line
    int line;              // where the error is
    const char* message;   // what follows "bf:LINE: "; nullptr: not checked here
  };
  char too_long_line[160];
  std::snprintf(too_long_line, sizeof too_long_line, "ui.%s -> modem.modem", long_name);
  char too_long_msg[160];
  std::snprintf(too_long_msg, sizeof too_long_msg,
                "interface name '%.32s...' is longer than LEMSG_MAX_NAME (%d characters)", long_name,
                LEMSG_MAX_NAME);
  const Case cases[] = {
      {"ui.modem modem.modem", 3, "no '->' in 'ui.modem modem.modem' (CLIENT.INTERFACE -> SERVER.SERVICE)"},
      {"ui.modem - > modem.modem", 3, "no '->' in 'ui.modem - > modem.modem' (CLIENT.INTERFACE -> SERVER.SERVICE)"},
      {"-> modem.modem", 3, "'-> modem.modem': the client is missing (CLIENT.INTERFACE -> SERVER.SERVICE)"},
      {"ui.modem ->", 3, "'ui.modem ->': the server is missing (CLIENT.INTERFACE -> SERVER.SERVICE)"},
      {"ui.modem -> modem.modem extra", 3,
       "'ui.modem -> modem.modem extra': one word each side of '->' (CLIENT.INTERFACE -> SERVER.SERVICE)"},
      {"ui modem -> modem.modem", 3,
       "'ui modem -> modem.modem': one word each side of '->' (CLIENT.INTERFACE -> SERVER.SERVICE)"},
      {"ui.modem -> modem.modem -> x.y", 3,
       "'ui.modem -> modem.modem -> x.y': one word each side of '->' (CLIENT.INTERFACE -> SERVER.SERVICE)"},
      {"ui.modem -> modem.modem->x.y", 3, "service name 'modem->x.y': character '>' is not one of [A-Za-z0-9._-]"},
      {"uimodem -> modem.modem", 3, "'uimodem': the client is USER.interface, with a '.' after the user"},
      {"ui.modem -> modem", 3, "'modem': the server is USER.service, with a '.' after the user"},
      {".modem -> modem.modem", 3, "'.modem': no client user before the '.'"},
      {"ui. -> modem.modem", 3, "'ui.': no interface name after the '.'"},
      {"ui..modem -> modem.modem", 3, "interface name '.modem' starts with '.'"},
      {"ui.mo/dem -> modem.modem", 3, "interface name 'mo/dem': character '/' is not one of [A-Za-z0-9._-]"},
      {"ui.modem -> modem.mo:dem", 3, "service name 'mo:dem': character ':' is not one of [A-Za-z0-9._-]"},
      {"ui.mödem -> modem.modem", 3, "interface name 'm??dem': character '?' is not one of [A-Za-z0-9._-]"},
      {too_long_line, 3, too_long_msg},
      {"nobody-here.modem -> modem.modem", 3, nullptr},  // checked below: it names the passwd file
      {"ui.modem -> ghost.modem", 3, nullptr},
      {"4294967295.modem -> modem.modem", 3, "client uid 4294967295 is out of range (at most 4294967294)"},
      {"ui.modem -> 4294967296.modem", 3, "server uid 4294967296 is out of range (at most 4294967294)"},
      {"99999999999999999999999.modem -> modem.modem", 3,
       "client uid 99999999999999999999999 is out of range (at most 4294967294)"},
      {"+5.modem -> modem.modem", 3, nullptr},  // a sign makes it a name, which no user has
      {"ui.modem -> modem.modem\n# and again:\n1002.modem -> logger.other", 5,
       "client uid 1002 has interface 'modem' bound twice (lines 3 and 5)"},
  };
  for (const Case& c : cases) {
    CAPTURE(c.bad_line);
    static Bindings b;
    char text[256];
    std::snprintf(text, sizeof text, "# first\nlogger.modem -> modem.modem\n%s\nui.ok -> modem.modem\n", c.bad_line);
    char err[256];
    // A table from before, which the bad text must leave alone.
    REQUIRE(parse(b, "1.x -> 2.y\n", err) == Result::Ok);
    CHECK(parse(b, text, err) == Result::BadParameter);
    CAPTURE(err);
    char prefix[16];
    std::snprintf(prefix, sizeof prefix, "bf:%d: ", c.line);
    CHECK(std::strncmp(err, prefix, 6) == 0);
    if (c.message != nullptr) CHECK(std::strcmp(err + 6, c.message) == 0);
    CHECK(std::strstr(err, "more error") == nullptr);
    REQUIRE(b.size() == 1);
    CHECK(b[0].client_uid == 1);
  }

  // The longest name fits.
  static Bindings b;
  char text[160];
  char err[256];
  std::snprintf(text, sizeof text, "ui.%s -> modem.%s", longest, longest);
  REQUIRE(parse(b, text, err) == Result::Ok);
  CHECK(std::strcmp(b[0].iface, longest) == 0);
  CHECK(std::strcmp(b[0].service, longest) == 0);

  // An unknown user: the message says which file it was looked up in.
  char expect[256];
  CHECK(parse(b, "# x\n\nghost.modem -> modem.modem\n", err) == Result::BadParameter);
  std::snprintf(expect, sizeof expect, "bf:3: unknown client user 'ghost' (not in %s)", pw.file.path);
  CHECK(std::strcmp(err, expect) == 0);
  CHECK(parse(b, "ui.modem -> +5.modem\n", err) == Result::BadParameter);
  std::snprintf(expect, sizeof expect, "bf:1: unknown server user '+5' (not in %s)", pw.file.path);
  CHECK(std::strcmp(err, expect) == 0);
}

TEST_CASE("bindings: a client bound twice is an error whether it is written as a name or a uid") {
  Passwd pw;
  static Bindings b;
  char err[256];
  CHECK(parse(b, "ui.modem -> modem.modem\n\n\n1002.modem -> modem.modem\n", err) == Result::BadParameter);
  CHECK(std::strcmp(err, "bf:4: client uid 1002 has interface 'modem' bound twice (lines 1 and 4)") == 0);
  // Two names of one uid (modem and twin are both 1001).
  CHECK(parse(b, "modem.x -> 0.s\ntwin.x -> 0.t\n", err) == Result::BadParameter);
  CHECK(std::strcmp(err, "bf:2: client uid 1001 has interface 'x' bound twice (lines 1 and 2)") == 0);
  // The same interface for two clients, and two interfaces for one client, are fine.
  REQUIRE(parse(b, "ui.modem -> modem.modem\nlogger.modem -> modem.modem\nui.modem2 -> modem.modem\n", err) ==
          Result::Ok);
  CHECK(b.size() == 3);
}

TEST_CASE("bindings: only the first error is spelled out, with how many more there were") {
  Passwd pw;
  static Bindings b;
  char err[256];
  CHECK(parse(b, "0.x -> 0.y\nbad line one\n0.z -> 0.w\nnope\n# c\nghost.a -> 0.b\n", err) ==
        Result::BadParameter);
  const char first[] = "bf:2: no '->' in 'bad line one' (CLIENT.INTERFACE -> SERVER.SERVICE) (and 2 more errors)";
  CHECK(std::strcmp(err, first) == 0);
  CHECK(parse(b, "0.x -> 0.y\n0.x -> 0.y\n0.x -> 0.y\n", err) == Result::BadParameter);
  CHECK(std::strcmp(err, "bf:2: client uid 0 has interface 'x' bound twice (lines 1 and 2) (and 1 more error)") ==
        0);
  // The file name defaults to "bindings"; a short buffer still ends in a NUL.
  CHECK(b.parse("x", 1, nullptr, err, sizeof err) == Result::BadParameter);
  CHECK(std::strncmp(err, "bindings:1: ", 12) == 0);
  char tiny[8];
  std::memset(tiny, 'z', sizeof tiny);
  CHECK(b.parse("x", 1, "bf", tiny, sizeof tiny) == Result::BadParameter);
  CHECK(std::strcmp(tiny, "bf:1: n") == 0);
  CHECK(b.parse("x", 1, "bf", nullptr, 0) == Result::BadParameter);
  CHECK(b.parse(nullptr, 1, "bf", err, sizeof err) == Result::BadParameter);
  CHECK(b.size() == 0);
}

TEST_CASE("bindings: the table holds exactly LEMSG_DIR_MAX_BINDINGS, then BindingTableFull at the first line over") {
  static Bindings b;
  static char text[kBigText];
  char err[256];
  std::size_t len = make_table(text, LEMSG_DIR_MAX_BINDINGS);
  REQUIRE(b.parse(text, len, "bf", err, sizeof err) == Result::Ok);
  REQUIRE(b.size() == LEMSG_DIR_MAX_BINDINGS);
  for (std::size_t i = 0; i < b.size(); ++i) {
    CHECK(b[i].client_uid == 1000 + i);
    CHECK(b[i].line == 2 * i + 1);
  }
  char iface[16];
  std::snprintf(iface, sizeof iface, "if%d", LEMSG_DIR_MAX_BINDINGS - 1);
  const Binding* last = b.find(1000 + LEMSG_DIR_MAX_BINDINGS - 1, iface);
  REQUIRE(last != nullptr);
  CHECK(last->line == 2 * LEMSG_DIR_MAX_BINDINGS - 1);
  CHECK(b.find(1000 + LEMSG_DIR_MAX_BINDINGS - 1, "if0") == nullptr);

  // One more binding: refused at its line, and the table is left as it was.
  static Bindings fresh;
  len = make_table(text, LEMSG_DIR_MAX_BINDINGS + 2);
  CHECK(b.parse(text, len, "bf", err, sizeof err) == Result::BindingTableFull);
  char expect[128];
  std::snprintf(expect, sizeof expect, "bf:%d: more than LEMSG_DIR_MAX_BINDINGS (%d) bindings",
                2 * LEMSG_DIR_MAX_BINDINGS + 1, LEMSG_DIR_MAX_BINDINGS);
  CHECK(std::strcmp(err, expect) == 0);  // one error for all the lines over, none counted twice
  CHECK(b.size() == LEMSG_DIR_MAX_BINDINGS);
  CHECK(fresh.parse(text, len, "bf", err, sizeof err) == Result::BindingTableFull);
  CHECK(fresh.size() == 0);

  // A syntax error after the table is full still counts: the first error decides.
  std::memcpy(text + len, "oops\n", 6);
  CHECK(fresh.parse(text, len + 5, "bf", err, sizeof err) == Result::BindingTableFull);
  CHECK(std::strstr(err, "(and 1 more error)") != nullptr);
}

TEST_CASE("bindings: a failed parse leaves the earlier table, a good one replaces it") {
  Passwd pw;
  static Bindings b;
  char err[256];
  REQUIRE(parse(b, "ui.modem -> modem.modem\nlogger.modem -> modem.modem\n", err) == Result::Ok);
  for (int round = 0; round < 3; ++round) {  // both of the two tables inside take a turn
    CHECK(parse(b, "ui.log -> logger.log\nui.modem -> ghost.modem\n", err) == Result::BadParameter);
    REQUIRE(b.size() == 2);
    CHECK(b.find(1002, "modem") != nullptr);
    CHECK(b.find(1003, "modem") != nullptr);
    CHECK(b.find(1002, "log") == nullptr);
  }
  REQUIRE(parse(b, "ui.log -> logger.log\n", err) == Result::Ok);
  CHECK(b.size() == 1);
  CHECK(b.find(1002, "modem") == nullptr);
  CHECK(b.find(1002, "log") != nullptr);
  CHECK(parse(b, "ui.log -> logger.log\nbad\n", err) == Result::BadParameter);
  CHECK(b.size() == 1);
  CHECK(b.find(1002, "log") != nullptr);
}

TEST_CASE("bindings: user names come from the passwd file LEMSG_PASSWD names") {
  uid_t uid = 77;
  char name[64];
  {
    Passwd pw;
    CHECK(std::strcmp(lemsg::detail::passwd_path(), pw.file.path) == 0);
    CHECK(lemsg::detail::lookup_user("root", uid));
    CHECK(uid == 0);
    CHECK(lemsg::detail::lookup_user("modem", uid));
    CHECK(uid == 1001);
    CHECK(lemsg::detail::lookup_user("ui", uid));  // its line is longer than the parser keeps
    CHECK(uid == 1002);
    CHECK(lemsg::detail::lookup_user("logger", uid));
    CHECK(uid == 1003);
    CHECK(lemsg::detail::lookup_user("last", uid));  // the last line has no newline
    CHECK(uid == 1005);
    uid = 77;
    CHECK_FALSE(lemsg::detail::lookup_user("+nis", uid));
    CHECK_FALSE(lemsg::detail::lookup_user("nis", uid));
    CHECK_FALSE(lemsg::detail::lookup_user("badnum", uid));
    CHECK_FALSE(lemsg::detail::lookup_user("mode", uid));
    CHECK_FALSE(lemsg::detail::lookup_user("modemx", uid));
    CHECK_FALSE(lemsg::detail::lookup_user("", uid));
    CHECK_FALSE(lemsg::detail::lookup_user(nullptr, uid));
    CHECK(uid == 77);

    // The reverse: the first name with the uid.
    CHECK(lemsg::detail::user_name(1001, name, sizeof name));
    CHECK(std::strcmp(name, "modem") == 0);
    CHECK(lemsg::detail::user_name(0, name, sizeof name));
    CHECK(std::strcmp(name, "root") == 0);
    CHECK(lemsg::detail::user_name(1005, name, sizeof name));
    CHECK(std::strcmp(name, "last") == 0);
    CHECK_FALSE(lemsg::detail::user_name(4242, name, sizeof name));
    CHECK(name[0] == '\0');
    char small[8];
    CHECK_FALSE(lemsg::detail::user_name(1004, small, sizeof small));  // does not fit
    CHECK(lemsg::detail::user_name(1004, name, sizeof name));
    CHECK(std::strcmp(name, "a-very-long-user-name-for-a-small-buffer") == 0);
    char five[5];
    CHECK(lemsg::detail::user_name(1003, name, 7));  // "logger" and its NUL
    CHECK_FALSE(lemsg::detail::user_name(1003, five, sizeof five));
    CHECK_FALSE(lemsg::detail::user_name(1003, nullptr, 0));
  }
  {
    // A passwd file that cannot be read: no user, and the message says so.
    EnvOverride env("LEMSG_PASSWD", "/nonexistent/lemsg/passwd");
    CHECK_FALSE(lemsg::detail::lookup_user("root", uid));
    CHECK_FALSE(lemsg::detail::user_name(0, name, sizeof name));
    static Bindings b;
    char err[256];
    CHECK(parse(b, "0.x -> root.y\n", err) == Result::BadParameter);
    CHECK(std::strcmp(err, "bf:1: unknown server user 'root' (cannot read /nonexistent/lemsg/passwd)") == 0);
    // Uids need no passwd file.
    CHECK(parse(b, "0.x -> 0.y\n", err) == Result::Ok);
  }
  {
    // Empty means the default.
    EnvOverride env("LEMSG_PASSWD", "");
    CHECK(std::strcmp(lemsg::detail::passwd_path(), "/etc/passwd") == 0);
  }
}

TEST_CASE("bindings: a passwd entry with uid (uid_t)-1 names no user") {
  // (uid_t)-1 is "no uid" (the parser refuses it written as a number); a
  // passwd line that gives it to a name must not smuggle it into the table
  // (found by the directory fuzz target).
  const char text[] = "nouid:x:4294967295:0::/:/bin/sh\nreal:x:1007:1007::/:/bin/sh\n";
  TempFile file{text};
  EnvOverride env{"LEMSG_PASSWD", file.path};
  uid_t uid = 77;
  CHECK_FALSE(lemsg::detail::lookup_user("nouid", uid));
  CHECK(uid == 77);
  CHECK(lemsg::detail::lookup_user("real", uid));
  CHECK(uid == 1007);
  char name[64];
  CHECK_FALSE(lemsg::detail::user_name(static_cast<uid_t>(-1), name, sizeof name));
  static Bindings b;
  char err[256];
  CHECK(parse(b, "0.x -> 0.y\n", err) == Result::Ok);
  CHECK(parse(b, "nouid.x -> 0.y\n", err) == Result::BadParameter);
  CHECK(std::strncmp(err, "bf:1: unknown client user 'nouid' (not in ", 42) == 0);
  CHECK(parse(b, "0.x -> nouid.y\n", err) == Result::BadParameter);
  REQUIRE(b.size() == 1);
  CHECK(b[0].server_uid == 0);
}

TEST_CASE("bindings: load() reads a file, and names it in every message") {
  Passwd pw;
  static Bindings b;
  char err[256];
  char expect[256];
  {
    TempFile f("# test\nui.modem -> modem.modem\r\nlogger.modem -> modem.modem\n");
    REQUIRE(b.load(f.path, err, sizeof err) == Result::Ok);
    CHECK(err[0] == '\0');
    CHECK(b.size() == 2);
  }
  {
    TempFile f("ui.modem -> modem.modem\n\n\nlogger.modem -> modem\n");
    CHECK(b.load(f.path, err, sizeof err) == Result::BadParameter);
    std::snprintf(expect, sizeof expect, "%s:4: 'modem': the server is USER.service, with a '.' after the user",
                  f.path);
    CHECK(std::strcmp(err, expect) == 0);
    CHECK(b.size() == 2);
  }
  // A missing file.
  CHECK(b.load("/nonexistent/lemsg/bindings", err, sizeof err) == Result::NotFound);
  CHECK(std::strcmp(err, "/nonexistent/lemsg/bindings: cannot open: No such file or directory") == 0);
  CHECK(b.size() == 2);
  // A directory.
  CHECK(b.load("/tmp", err, sizeof err) == Result::BadParameter);
  CHECK(std::strcmp(err, "/tmp: not a regular file") == 0);
  CHECK(b.load(nullptr, err, sizeof err) == Result::BadParameter);
  CHECK(b.size() == 2);
}

TEST_CASE("bindings: load() takes a file of LEMSG_DIR_MAX_BINDINGS_FILE bytes, not one more") {
  static char text[LEMSG_DIR_MAX_BINDINGS_FILE + 1];
  // One binding, then comment lines up to exactly the limit.
  const char first[] = "0.x -> 0.y\n";
  std::memset(text, '#', sizeof text);
  std::memcpy(text, first, sizeof first - 1);
  for (std::size_t i = 100; i < sizeof text; i += 100) text[i] = '\n';
  static Bindings b;
  char err[256];
  {
    TempFile f(text, LEMSG_DIR_MAX_BINDINGS_FILE);
    REQUIRE(b.load(f.path, err, sizeof err) == Result::Ok);
    CHECK(b.size() == 1);
  }
  {
    TempFile f(text, LEMSG_DIR_MAX_BINDINGS_FILE + 1);
    CHECK(b.load(f.path, err, sizeof err) == Result::BadParameter);
    char expect[160];
    std::snprintf(expect, sizeof expect, "%s: larger than LEMSG_DIR_MAX_BINDINGS_FILE (%d bytes)", f.path,
                  LEMSG_DIR_MAX_BINDINGS_FILE);
    CHECK(std::strcmp(err, expect) == 0);
    CHECK(b.size() == 1);
  }
}

}  // TEST_SUITE
