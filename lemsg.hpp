// lemsg.hpp - messaging between processes on one embedded Linux device.
// Version 0.2.0. Single header, C++17, no heap after initialisation, poll().
//
// =============================================================================
// Summary
// =============================================================================
//
// lemsg gives firmware processes Legato-style IPC (services, sessions, pooled
// messages, request/response, clients that wait for servers, clean-up when a
// peer dies) with no framework, no daemon to run and no runtime dependency
// beyond libc. Drop this file into your tree and include it; there is nothing
// to link. Build with -std=c++17 (-fno-exceptions -fno-rtti are fine) and
// -pthread.
//
// =============================================================================
// Quick start
// =============================================================================
//
//   static const lemsg::Protocol kEcho{"example.echo.v1", 128};
//
//   // server process
//   lemsg::Loop loop;
//   lemsg::MessagePool<128, 8> pool;             // 8 messages, fixed storage
//   lemsg::Service svc(loop, kEcho, pool);
//   svc.set_receive_handler([&](lemsg::Message& m) {
//     if (m.needs_response() && svc.respond(std::move(m)) != lemsg::Result::Ok) { /* log */ }
//   });
//   svc.set_close_handler([&](lemsg::SessionRef s, lemsg::Result why) { /* client closed or died */ });
//   if (svc.advertise("echo") != lemsg::Result::Ok) return 1;   // /run/lemsg/echo
//   loop.run();
//
//   // client process
//   lemsg::Loop loop;
//   lemsg::MessagePool<128, 8> pool;
//   lemsg::Session s(loop, kEcho, pool);
//   if (s.open_sync("echo", 2000) != lemsg::Result::Ok) return 1;  // waits for the server
//   lemsg::Message req, resp;
//   if (s.create_message(req) != lemsg::Result::Ok || req.assign("hi", 2) != lemsg::Result::Ok) return 1;
//   if (s.request_sync(std::move(req), resp, 1000) != lemsg::Result::Ok) return 1;
//
// README.md has the complete program (compiled and run by the tests).
//
// =============================================================================
// Configuration (define before including; set them once for the whole build,
// in CPPFLAGS, because they change the layout of types)
// =============================================================================
//
//   LEMSG_MAX_WATCHES     96  fd watches one Loop holds (a Service uses one per
//                             session and per connection awaiting its hello,
//                             plus one; a Session one, two while waiting).
//   LEMSG_MAX_TIMERS      32  timers one Loop holds (each Service and Session: one).
//   LEMSG_MAX_POSTED      64  functions queued by Loop::post() and not yet run.
//   LEMSG_MAX_SESSIONS    64  sessions one Service holds; more: SessionTableFull.
//   LEMSG_MAX_SESSIONS_PER_UID  3/4 of LEMSG_MAX_SESSIONS (48)  sessions one
//                             client uid holds on one Service; more: UidShareFull.
//                             Not applied to uid 0 or the service's own uid,
//                             which could stop the service anyway.
//   LEMSG_MAX_HANDSHAKES  16  connections one Service holds whose hello has not
//                             arrived; they take no session slot. When full,
//                             the oldest is closed to make room.
//   LEMSG_MAX_HANDSHAKES_PER_UID  half of LEMSG_MAX_HANDSHAKES (8)  of those,
//                             from one client uid (not 0 or the service's
//                             own); beyond, that uid's oldest is closed.
//   LEMSG_MAX_PENDING     32  requests one Session waits on; more: PendingTableFull.
//   LEMSG_MAX_OUTGOING    16  frames queued per session when the peer does not
//                             read; more: Overflow.
//   LEMSG_MAX_DEFERRED    16  frames held back while request_sync waits; more
//                             closes the session with Overflow.
//   LEMSG_MAX_SERVICES    16  services one process advertises; more: ServiceTableFull.
//   LEMSG_MAX_TRACKED      4  RefMaps one Service releases per closing session.
//   LEMSG_MAX_NAME        48  characters in a service name ([A-Za-z0-9._-]).
//   LEMSG_MAX_PROTOCOL_ID 64  characters in a protocol id.
//   LEMSG_OPEN_TIMEOUT_MS 5000  how long either side waits for the other's half
//                             of the open handshake.
//   LEMSG_TXN_BITS        32  bits of the transaction ids a Session hands out;
//                             they wrap (never onto a pending one) after
//                             2^bits / LEMSG_MAX_PENDING requests per slot.
//                             Lower it only to test the wrap.
//   LEMSG_HANDLE_GENERATIONS 0  generations a slot of the library's own handle
//                             tables (WatchId, TimerId, SessionRef) goes
//                             through before it wraps to the first again;
//                             0 = all the slot index leaves room for.
//                             Lower it only to test the wrap.
//   LEMSG_STALL_TIMEOUT_MS 30000  a client that reads nothing this long while
//                             frames wait for it is closed with Stalled, whatever
//                             its socket's other holders do (ServiceOptions::
//                             stall_timeout_ms overrides it per Service).
//   LEMSG_MAX_MONITORS     2  monitors attached to one Service at once
//                             (section 13); one more is refused with Busy.
//   LEMSG_MONITOR_PAYLOAD 64  payload bytes of each frame a monitor that
//                             asks for payloads receives (0..4096).
//   LEMSG_DIR_MAX_*           the service directory's tables (section 13);
//                             they matter only in the build of the daemon
//                             (lemsg-dir), not in its servers and clients.
//   LEMSG_DIR_MAX_SERVICES 32  services one directory holds registered;
//                             more: RegistryFull.
//   LEMSG_DIR_MAX_WAITING 32  clients one directory holds waiting for a
//                             binding or a server (one uid other than root:
//                             half of them); more: WaitTableFull.
//   LEMSG_DIR_MAX_BINDINGS 128  bindings in a bindings file; more: BindingTableFull.
//   LEMSG_DIR_MAX_BINDINGS_FILE 65536  bytes of a bindings file (64..16 MiB);
//                             a larger file is refused with BadParameter.
//   LEMSG_DIR_MAX_CONNECTIONS 16  connections to the directory that have not
//                             said what they are yet (as LEMSG_MAX_HANDSHAKES).
//   LEMSG_DIR_MAX_CONNECTIONS_PER_UID  half of that (8): beyond, that uid's
//                             oldest is closed.
//   LEMSG_CALLABLE_SIZE   32  bytes a handler may capture in place, the same
//                             on every target (four 64-bit values or pointers),
//                             so a handler that compiles on the PC compiles
//                             for the device; a larger capture is a
//                             compile-time error.
//   LEMSG_LOG_LEVEL       1   default run-time log threshold
//                             (0 error, 1 warning, 2 info, 3 debug).
//   LEMSG_ASSERT(cond)    checks the library's own invariants; default logs
//                         and calls abort(). Never used for peer input.
//   LEMSG_LOG(level, fmt, ...)  where log lines go; default formats into a
//                         stack buffer and hands the line to the sink set by
//                         lemsg::set_log_sink() (stderr when none is set).
//
// =============================================================================
// Concepts
// =============================================================================
//
//   Result     every call that can fail returns one; [[nodiscard]]; to_string()
//              names the capacity macro to raise when a table is full.
//   Pool       Count blocks of BlockSize bytes; alloc/add_ref/release; an
//              empty pool is Result::PoolEmpty; a foreign pointer or a second
//              release is detected and refused.
//   Callable   Callable<void(int)> holds a lambda or function pointer in place.
//   RefMap     RefMap<T, N> maps opaque uint32_t references (never 0) to T*.
//              A removed, reused, wrapped, forged or foreign reference looks up
//              as nullptr. Entries may carry an owner key; release_owner()
//              drops every entry of one owner (a session that closed or died).
//   Loop       one thread's poll() loop. Handlers run on the thread that calls
//              run()/run_once()/dispatch(). Other threads use post() and stop().
//   Protocol   id + largest payload; both ends must agree or the open fails.
//   Message    reference-counted handle to a pooled block: payload, size, one
//              optional fd. Only the used bytes travel.
//   Service    server end: advertise/hide, open/close/receive handlers,
//              per-session context and credentials, send, respond, close,
//              track(RefMap) for per-client clean-up. ServiceOptions: the
//              socket file's mode and group, a uid/gid allow-list.
//   Session    client end: open (async, waits for the server), open_sync,
//              try_open, send, request, request_sync, reconnect with backoff,
//              require_server_uid (talk only to a server of that user).
//   Typed      an interface declared once in plain C++ structs (LEMSG_METHOD,
//              LEMSG_ONEWAY, LEMSG_EVENT, Interface): TypedService and
//              TypedClient call it like functions, with a compile-time
//              protocol hash, events with subscriptions, Responder for answers
//              given later, and Ref<Tag> references bound to one session.
//   Runtime dir  <runtime dir>/<name> is a service's socket; both ends
//              refuse a runtime dir another user owns or may write (see 7).
//   Directory  directory mode (LEMSG_DIRECTORY=1, or ServiceOptions::
//              discovery and Session::set_discovery): a server registers its
//              name with the lemsg-dir daemon (class Directory) instead of
//              making a socket file; a client asks for an interface by its
//              own name and the daemon, by the client's uid and the
//              bindings, hands its socket to the server. After the
//              hand-over the session is direct; the daemon may die and
//              restart without touching it.
//   Bindings   the daemon's bindings file: "ui.modem -> modem.modem", client
//              user and interface to server user and service; checked with
//              file and line (lemsg-dir --check), reloaded on SIGHUP.
//   Introspection  every Service answers an info query (query_info:
//              sessions, pool, counters) and feeds monitors (Monitor: one
//              record per frame), to root and its own uid only. The lemsg
//              tool prints them: lemsg list, info, monitor, wait, bindings.
//
// =============================================================================
// Threading
// =============================================================================
//
// A Loop and everything created on it belong to the thread that runs it.
// Loop::post() and Loop::stop() may be called from any thread. Pool, RefMap,
// Callable, Message, Service and Session are not thread-safe; keep each on its
// loop's thread. open_sync, try_open and request_sync block their thread (the
// loop does not run meanwhile); when only that thread's loop could answer,
// they return WouldDeadlock instead of blocking. A loop belongs to the thread
// that dispatches it (run, run_once or dispatch, whichever it uses), not the
// one that built it; before its first dispatch it belongs to no thread, and a
// synchronous call to its service waits for its timeout like any other.
//
// =============================================================================
// Memory
// =============================================================================
//
// Every table has a capacity fixed at compile time. Nothing in this header
// calls malloc or new: storage is inside the objects you declare, or storage
// you pass in (PoolBase::init). Exhausting a capacity returns a Result; it
// never aborts.
//
// Lifetimes: create the Loop and the pools first and destroy every Service,
// Session and Message before them; their destructors otherwise log the
// mistake and fail LEMSG_ASSERT. A request a Service received may outlive it
// (releasing it then answers nothing). Any handler may close or destroy the
// Service or Session that called it; the library touches nothing of it after.
//
// =============================================================================
// Errors and troubleshooting
// =============================================================================
//
// Print to_string(result). A full table names the macro to raise. With
// LEMSG_LOG_LEVEL 3 (or set_log_level(LogLevel::Debug), or LEMSG_LOG=debug in
// the environment) the library logs each
// decision; a refused client or a bad frame is logged as a warning.
//   - open_sync returns Timeout: is the server advertising under the same
//     runtime dir (LEMSG_RUNTIME_DIR) and name? ls the runtime dir, or run
//     `lemsg list`. In directory mode `lemsg list` shows the registered
//     services, the clients waiting (and for what) and the bindings: a
//     client waiting there lacks its binding or its server.
//   - NotPermitted: the socket file's mode/owner/group, or the allow-list.
//     In directory mode, from try_open: this uid has no binding for the
//     interface (add one and reload lemsg-dir); from advertise: a binding
//     gives the name to another user's service; from query_info or a
//     Monitor: only root and the service's own uid may look.
//   - Duplicate at advertise in directory mode: another server has the name
//     registered (lemsg list names its owner and pid).
//   - RegistryFull, WaitTableFull: the directory's tables of registered
//     services or waiting clients are full; raise LEMSG_DIR_MAX_SERVICES or
//     LEMSG_DIR_MAX_WAITING in the build of lemsg-dir. A client that waits
//     with open() asks again later by itself.
//   - BindingTableFull: the bindings file has more than
//     LEMSG_DIR_MAX_BINDINGS bindings; lemsg-dir --check names the line.
//   - NoRuntimeDir at advertise: this user cannot create or write the
//     runtime dir (/run/lemsg needs root): set LEMSG_RUNTIME_DIR to a
//     directory of this user's, or have it created owned by this user.
//   - UnsafeRuntimeDir: another user owns or may write the runtime dir (or a
//     directory above it without the sticky bit); the log names it. Use a
//     directory owned by root or by this user, mode 0755 or 0700.
//   - UntrustedServer: Session::require_server_uid() asked for another user
//     than the one the server runs as (the log says both).
//   - ProtocolMismatch / SizeMismatch: client and server were built against
//     different protocol declarations.
//   - "accept failed: Too many open files; pausing accepts": the process ran
//     out of fds. The Service stops watching its socket, retries on its timer
//     (50 ms doubling to 1 s) and logs "accepting again" (info) when it can;
//     waiting clients stay in the backlog meanwhile.
//   - A watch whose fd was closed before remove_watch() gets POLLNVAL once; if
//     the handler leaves it in place, the Loop removes it and logs a warning.
//   - Reentrant: run(), run_once() or dispatch() was called from inside a
//     handler of the same loop; return from the handler instead.
//
// =============================================================================
// Contents
// =============================================================================
//
//   1. Configuration                >>config
//   2. Result                       >>result
//   3. Fixed storage                >>pool
//   4. Safe reference tables        >>refmap
//   5. Wire format                  >>wire
//   6. Event loop                   >>loop
//   7. Transport                    >>transport
//   8. Messages                     >>message
//   9. Channel                      >>channel
//   10. Service                     >>service
//   11. Session                     >>session
//   12. Typed interfaces            >>typed
//   13. Service directory           >>directory

#ifndef LEMSG_HPP
#define LEMSG_HPP

#define LEMSG_VERSION_MAJOR 0
#define LEMSG_VERSION_MINOR 2
#define LEMSG_VERSION_PATCH 0
#define LEMSG_VERSION_STR "0.2.0"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/signalfd.h>
#include <sys/inotify.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
#include <type_traits>
#include <utility>

// =============================================================================
// 1. Configuration                                                    >>config
// =============================================================================

#ifndef LEMSG_MAX_WATCHES
#define LEMSG_MAX_WATCHES 96
#endif
#ifndef LEMSG_MAX_TIMERS
#define LEMSG_MAX_TIMERS 32
#endif
#ifndef LEMSG_MAX_POSTED
#define LEMSG_MAX_POSTED 64
#endif
#ifndef LEMSG_CALLABLE_SIZE
#define LEMSG_CALLABLE_SIZE 32
#endif
#ifndef LEMSG_LOG_LEVEL
#define LEMSG_LOG_LEVEL 1
#endif
#ifndef LEMSG_MAX_SESSIONS
#define LEMSG_MAX_SESSIONS 64
#endif
#ifndef LEMSG_MAX_SESSIONS_PER_UID
#define LEMSG_MAX_SESSIONS_PER_UID ((LEMSG_MAX_SESSIONS * 3 + 3) / 4)
#endif
#ifndef LEMSG_MAX_HANDSHAKES
#define LEMSG_MAX_HANDSHAKES 16
#endif
#ifndef LEMSG_MAX_HANDSHAKES_PER_UID
#define LEMSG_MAX_HANDSHAKES_PER_UID ((LEMSG_MAX_HANDSHAKES + 1) / 2)
#endif
#ifndef LEMSG_MAX_PENDING
#define LEMSG_MAX_PENDING 32
#endif
#ifndef LEMSG_MAX_OUTGOING
#define LEMSG_MAX_OUTGOING 16
#endif
#ifndef LEMSG_MAX_DEFERRED
#define LEMSG_MAX_DEFERRED 16
#endif
#ifndef LEMSG_MAX_SERVICES
#define LEMSG_MAX_SERVICES 16
#endif
#ifndef LEMSG_MAX_TRACKED
#define LEMSG_MAX_TRACKED 4
#endif
#ifndef LEMSG_MAX_NAME
#define LEMSG_MAX_NAME 48
#endif
#ifndef LEMSG_MAX_PROTOCOL_ID
#define LEMSG_MAX_PROTOCOL_ID 64
#endif
#ifndef LEMSG_OPEN_TIMEOUT_MS
#define LEMSG_OPEN_TIMEOUT_MS 5000
#endif
#ifndef LEMSG_TXN_BITS
#define LEMSG_TXN_BITS 32
#endif
#ifndef LEMSG_HANDLE_GENERATIONS
#define LEMSG_HANDLE_GENERATIONS 0
#endif
#ifndef LEMSG_STALL_TIMEOUT_MS
#define LEMSG_STALL_TIMEOUT_MS 30000
#endif
#ifndef LEMSG_MAX_MONITORS
#define LEMSG_MAX_MONITORS 2
#endif
#ifndef LEMSG_MONITOR_PAYLOAD
#define LEMSG_MONITOR_PAYLOAD 64
#endif
#ifndef LEMSG_DIR_MAX_SERVICES
#define LEMSG_DIR_MAX_SERVICES 32
#endif
#ifndef LEMSG_DIR_MAX_WAITING
#define LEMSG_DIR_MAX_WAITING 32
#endif
#ifndef LEMSG_DIR_MAX_BINDINGS
#define LEMSG_DIR_MAX_BINDINGS 128
#endif
#ifndef LEMSG_DIR_MAX_CONNECTIONS
#define LEMSG_DIR_MAX_CONNECTIONS 16
#endif
#ifndef LEMSG_DIR_MAX_CONNECTIONS_PER_UID
#define LEMSG_DIR_MAX_CONNECTIONS_PER_UID ((LEMSG_DIR_MAX_CONNECTIONS + 1) / 2)
#endif
#ifndef LEMSG_DIR_MAX_BINDINGS_FILE
#define LEMSG_DIR_MAX_BINDINGS_FILE 65536
#endif

static_assert(LEMSG_MAX_WATCHES >= 1 && LEMSG_MAX_WATCHES <= 4096, "LEMSG_MAX_WATCHES must be 1..4096");
static_assert(LEMSG_MAX_TIMERS >= 1 && LEMSG_MAX_TIMERS <= 4096, "LEMSG_MAX_TIMERS must be 1..4096");
static_assert(LEMSG_MAX_POSTED >= 1 && LEMSG_MAX_POSTED <= 65536, "LEMSG_MAX_POSTED must be 1..65536");
static_assert(LEMSG_CALLABLE_SIZE >= sizeof(void*), "LEMSG_CALLABLE_SIZE must hold at least one pointer");
static_assert(LEMSG_LOG_LEVEL >= 0 && LEMSG_LOG_LEVEL <= 3, "LEMSG_LOG_LEVEL must be 0..3");
static_assert(LEMSG_MAX_SESSIONS >= 1 && LEMSG_MAX_SESSIONS <= 4096, "LEMSG_MAX_SESSIONS must be 1..4096");
static_assert(LEMSG_MAX_SESSIONS_PER_UID >= 1 && LEMSG_MAX_SESSIONS_PER_UID <= LEMSG_MAX_SESSIONS,
              "LEMSG_MAX_SESSIONS_PER_UID must be 1..LEMSG_MAX_SESSIONS");
static_assert(LEMSG_MAX_HANDSHAKES >= 1 && LEMSG_MAX_HANDSHAKES <= 4096, "LEMSG_MAX_HANDSHAKES must be 1..4096");
static_assert(LEMSG_MAX_HANDSHAKES_PER_UID >= 1 && LEMSG_MAX_HANDSHAKES_PER_UID <= LEMSG_MAX_HANDSHAKES,
              "LEMSG_MAX_HANDSHAKES_PER_UID must be 1..LEMSG_MAX_HANDSHAKES");
static_assert(LEMSG_MAX_PENDING >= 1 && LEMSG_MAX_PENDING <= 65536, "LEMSG_MAX_PENDING must be 1..65536");
static_assert(LEMSG_MAX_OUTGOING >= 1 && LEMSG_MAX_OUTGOING <= 4096, "LEMSG_MAX_OUTGOING must be 1..4096");
static_assert(LEMSG_MAX_DEFERRED >= 1 && LEMSG_MAX_DEFERRED <= 4096, "LEMSG_MAX_DEFERRED must be 1..4096");
static_assert(LEMSG_MAX_SERVICES >= 1 && LEMSG_MAX_SERVICES <= 1024, "LEMSG_MAX_SERVICES must be 1..1024");
static_assert(LEMSG_MAX_TRACKED >= 1 && LEMSG_MAX_TRACKED <= 64, "LEMSG_MAX_TRACKED must be 1..64");
static_assert(LEMSG_MAX_NAME >= 1 && LEMSG_MAX_NAME <= 64, "LEMSG_MAX_NAME must be 1..64");
static_assert(LEMSG_MAX_PROTOCOL_ID >= 1 && LEMSG_MAX_PROTOCOL_ID <= 256, "LEMSG_MAX_PROTOCOL_ID must be 1..256");
static_assert(LEMSG_OPEN_TIMEOUT_MS >= 1, "LEMSG_OPEN_TIMEOUT_MS must be positive");
static_assert(LEMSG_TXN_BITS >= 2 && LEMSG_TXN_BITS <= 32, "LEMSG_TXN_BITS must be 2..32");
static_assert(LEMSG_HANDLE_GENERATIONS >= 0, "LEMSG_HANDLE_GENERATIONS must be 0 (all) or more");
static_assert(LEMSG_MAX_MONITORS >= 1 && LEMSG_MAX_MONITORS <= 64, "LEMSG_MAX_MONITORS must be 1..64");
static_assert(LEMSG_MONITOR_PAYLOAD >= 0 && LEMSG_MONITOR_PAYLOAD <= 4096, "LEMSG_MONITOR_PAYLOAD must be 0..4096");
static_assert(LEMSG_DIR_MAX_SERVICES >= 1 && LEMSG_DIR_MAX_SERVICES <= 4096, "LEMSG_DIR_MAX_SERVICES must be 1..4096");
static_assert(LEMSG_DIR_MAX_WAITING >= 1 && LEMSG_DIR_MAX_WAITING <= 4096, "LEMSG_DIR_MAX_WAITING must be 1..4096");
static_assert(LEMSG_DIR_MAX_BINDINGS >= 1 && LEMSG_DIR_MAX_BINDINGS <= 65536, "LEMSG_DIR_MAX_BINDINGS must be 1..65536");
static_assert(LEMSG_DIR_MAX_CONNECTIONS >= 1 && LEMSG_DIR_MAX_CONNECTIONS <= 4096,
              "LEMSG_DIR_MAX_CONNECTIONS must be 1..4096");
static_assert(LEMSG_DIR_MAX_CONNECTIONS_PER_UID >= 1 && LEMSG_DIR_MAX_CONNECTIONS_PER_UID <= LEMSG_DIR_MAX_CONNECTIONS,
              "LEMSG_DIR_MAX_CONNECTIONS_PER_UID must be 1..LEMSG_DIR_MAX_CONNECTIONS");
static_assert(LEMSG_DIR_MAX_BINDINGS_FILE >= 64 && LEMSG_DIR_MAX_BINDINGS_FILE <= 16777216,
              "LEMSG_DIR_MAX_BINDINGS_FILE must be 64..16777216");
static_assert(LEMSG_STALL_TIMEOUT_MS >= 1 && LEMSG_STALL_TIMEOUT_MS <= 86400000,
              "LEMSG_STALL_TIMEOUT_MS must be 1..86400000");

namespace lemsg {

/// Log levels, for LEMSG_LOG, set_log_level() and the sink.
enum class LogLevel : int { Error = 0, Warning = 1, Info = 2, Debug = 3 };

/// Where formatted log lines go. The line has no trailing newline. Called on
/// whichever thread logged; keep it short and thread-safe.
using LogSink = void (*)(LogLevel level, const char* line, void* ctx);

/// Sends log lines to `sink` (nullptr restores stderr). Call at start-up,
/// before other threads log.
inline void set_log_sink(LogSink sink, void* ctx) noexcept;

/// Lines above `level` are dropped. Default LEMSG_LOG_LEVEL. The environment
/// variable LEMSG_LOG (error, warning, info or debug; or 0..3), read at the
/// first log line, wins over both, so a deployed program can be made to log
/// its decisions without a rebuild: LEMSG_LOG=debug ./server
inline void set_log_level(LogLevel level) noexcept;

/// The threshold in force: LEMSG_LOG when set, else set_log_level()'s, else
/// LEMSG_LOG_LEVEL.
inline LogLevel log_level() noexcept;

// -- implementation --

namespace detail {

struct LogState {
  LogSink sink = nullptr;
  void* ctx = nullptr;
  std::atomic<int> level{LEMSG_LOG_LEVEL};
  std::atomic<int> env{-2};  // LEMSG_LOG: -2 not read yet, -1 unset or not understood
};
inline LogState& log_state() noexcept {
  static LogState state;
  return state;
}

// LEMSG_LOG's level, or -1.
inline int env_log_level() noexcept {
  const char* e = std::getenv("LEMSG_LOG");
  if (!e || !*e) return -1;
  static const char* const names[][2] = {{"error", "0"}, {"warning", "1"}, {"info", "2"}, {"debug", "3"}};
  for (int i = 0; i < 4; ++i)
    if (std::strcmp(e, names[i][0]) == 0 || std::strcmp(e, names[i][1]) == 0) return i;
  if (std::strcmp(e, "warn") == 0) return 1;
  return -1;
}

inline int log_threshold() noexcept {
  LogState& st = log_state();
  int e = st.env.load(std::memory_order_relaxed);
  if (e == -2) {
    e = env_log_level();
    st.env.store(e, std::memory_order_relaxed);
  }
  return e >= 0 ? e : st.level.load(std::memory_order_relaxed);
}

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
inline void
log_printf(LogLevel level, const char* fmt, ...) noexcept {
  if (static_cast<int>(level) > log_threshold()) return;
  LogState& st = log_state();
  // A stack buffer keeps logging off the heap; long lines are cut, not lost.
  char line[256];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  if (st.sink) {
    st.sink(level, line, st.ctx);
    return;
  }
  static const char* const names[] = {"error", "warning", "info", "debug"};
  std::fprintf(stderr, "lemsg %s: %s\n", names[static_cast<int>(level)], line);
}

[[noreturn]] inline void assert_fail(const char* cond, const char* file, int line) noexcept {
  log_printf(LogLevel::Error, "assertion failed: %s (%s:%d)", cond, file, line);
  std::abort();
}

}  // namespace detail

inline void set_log_sink(LogSink sink, void* ctx) noexcept {
  detail::log_state().sink = sink;
  detail::log_state().ctx = ctx;
}

inline void set_log_level(LogLevel level) noexcept {
  detail::log_state().level.store(static_cast<int>(level), std::memory_order_relaxed);
}

inline LogLevel log_level() noexcept { return static_cast<LogLevel>(detail::log_threshold()); }

}  // namespace lemsg

#ifndef LEMSG_LOG
#define LEMSG_LOG(level, ...) ::lemsg::detail::log_printf(::lemsg::LogLevel::level, __VA_ARGS__)
#endif
#ifndef LEMSG_ASSERT
#define LEMSG_ASSERT(cond) \
  ((cond) ? static_cast<void>(0) : ::lemsg::detail::assert_fail(#cond, __FILE__, __LINE__))
#endif

// =============================================================================
// 2. Result                                                           >>result
// =============================================================================

namespace lemsg {

// One list gives the enumerators and their strings, so they cannot drift.
#define LEMSG_DETAIL_RESULTS(X)                                                \
  X(Ok, "ok")                                                                  \
  X(BadParameter, "bad parameter")                                             \
  X(NotFound, "not found: no server listens on that name, or the reference, id or session is stale or unknown") \
  X(NoMemory, "reference table full (raise the RefMap's N)")                   \
  X(PoolEmpty, "pool empty (raise the pool's block count)")                    \
  X(NotPoolBlock, "pointer is not a block of this pool")                       \
  X(DoubleFree, "pool block released more times than referenced")             \
  X(WatchTableFull, "watch table full (raise LEMSG_MAX_WATCHES)")              \
  X(TimerTableFull, "timer table full (raise LEMSG_MAX_TIMERS)")               \
  X(QueueFull, "post queue full (raise LEMSG_MAX_POSTED)")                     \
  X(Timeout, "timed out")                                                      \
  X(SystemError, "system call failed (errno in the log)")                      \
  X(NotPermitted, "not permitted (socket file mode, the service's allow-list, or the directory's bindings)") \
  X(Closed, "session closed")                                                  \
  X(ProtocolMismatch, "client and server protocol ids differ")                 \
  X(SizeMismatch, "client and server maximum payload sizes differ")            \
  X(WouldDeadlock, "only this thread's own loop could answer this synchronous call") \
  X(Duplicate, "already exists (another live server has the name, or a file that is not a socket)") \
  X(Busy, "busy (already open, opening or advertised; or the server's backlog is full)") \
  X(SessionTableFull, "session table full (raise LEMSG_MAX_SESSIONS)")         \
  X(PendingTableFull, "pending request table full (raise LEMSG_MAX_PENDING)")  \
  X(Overflow, "peer is not reading: send queue full (raise LEMSG_MAX_OUTGOING)") \
  X(BadFrame, "peer sent a malformed frame")                                   \
  X(TooLarge, "payload larger than the protocol's maximum")                    \
  X(WouldBlock, "operation would block")                                       \
  X(Unanswered, "the server released the request without responding")        \
  X(ServiceTableFull, "this process's service table is full (raise LEMSG_MAX_SERVICES)") \
  X(TrackTableFull, "tracked map table full (raise LEMSG_MAX_TRACKED)")         \
  X(TooBigForSocket, "frame too large for one socket datagram here (lower the protocol's max_payload or raise net.core.wmem_max)") \
  X(UnsafeRuntimeDir, "runtime dir unsafe: another user owns or may write it or a directory above it (see the log)") \
  X(NoRuntimeDir, "cannot create or write the runtime dir: set LEMSG_RUNTIME_DIR, or create it owned by this user") \
  X(UntrustedServer, "the server runs as another user than Session::require_server_uid() asks for") \
  X(Stalled, "peer read nothing for the stall timeout while frames waited (LEMSG_STALL_TIMEOUT_MS)") \
  X(UidShareFull, "this uid holds its share of the service's sessions (raise LEMSG_MAX_SESSIONS_PER_UID)") \
  X(Reentrant, "called from inside a handler of the same loop (run, run_once and dispatch do not nest)") \
  X(BoundExceeded, "more elements or bytes than the String's, Array's or Bytes' bound N") \
  X(BadReference, "a reference in the request names no object of the calling session (stale, forged or another session's)") \
  X(RegistryFull, "the directory's table of registered services is full (raise LEMSG_DIR_MAX_SERVICES)") \
  X(WaitTableFull, "the directory's table of waiting clients is full (raise LEMSG_DIR_MAX_WAITING)") \
  X(BindingTableFull, "the bindings table is full (raise LEMSG_DIR_MAX_BINDINGS)")

/// Outcome of every call that can fail. Ok is 0. Ignoring one is a warning.
enum class [[nodiscard]] Result : int {
#define LEMSG_DETAIL_ENUM(name, text) name,
  LEMSG_DETAIL_RESULTS(LEMSG_DETAIL_ENUM)
#undef LEMSG_DETAIL_ENUM
};

/// A fixed, human-readable description of `r`; never nullptr.
inline const char* to_string(Result r) noexcept;

/// How many Result values there are (codes 0 .. result_count - 1).
#define LEMSG_DETAIL_COUNT(name, text) +1
constexpr int result_count = 0 LEMSG_DETAIL_RESULTS(LEMSG_DETAIL_COUNT);
#undef LEMSG_DETAIL_COUNT

// -- implementation --

inline const char* to_string(Result r) noexcept {
  switch (r) {
#define LEMSG_DETAIL_CASE(name, text) \
  case Result::name:                  \
    return text;
    LEMSG_DETAIL_RESULTS(LEMSG_DETAIL_CASE)
#undef LEMSG_DETAIL_CASE
  }
  return "unknown result";
}

// =============================================================================
// 3. Fixed storage                                                      >>pool
// =============================================================================

/// Count blocks of one size, handed out with a reference count of 1.
/// Not thread-safe: a pool belongs to one thread (its Loop's).
/// The storage is the caller's (init) or the Pool<> object's own.
/// alloc(): Ok, or PoolEmpty when every block is in use (raise the count).
/// add_ref()/release(): NotPoolBlock for a pointer that is not the start of
/// one of this pool's blocks, DoubleFree for a block that is not in use.
class PoolBase {
 public:
  /// Alignment of every block (and required of storage passed to init()).
  static constexpr std::size_t alignment = alignof(std::max_align_t);

  /// How many uint32_t words of `meta` init() needs for `count` blocks.
  static constexpr std::size_t meta_words(std::size_t count) noexcept { return 2 * count; }

  /// Rounds a block size up so that every block stays aligned.
  static constexpr std::size_t round_block(std::size_t size) noexcept {
    return (size + alignment - 1) / alignment * alignment;
  }

  PoolBase() noexcept = default;
  PoolBase(const PoolBase&) = delete;
  PoolBase& operator=(const PoolBase&) = delete;

  /// Uses caller storage: `blocks` holds count * round_block(block_size) bytes
  /// aligned to `alignment`; `meta` holds meta_words(count) uint32_t.
  /// Ok, or BadParameter (null, misaligned, zero size or count, count over
  /// 2^31, or the pool already holds storage).
  Result init(void* blocks, std::size_t block_size, std::size_t count, std::uint32_t* meta) noexcept;

  /// Takes a free block (reference count 1). Ok or PoolEmpty; `out` is nullptr on failure.
  Result alloc(void*& out) noexcept;
  /// Adds a reference to a block in use.
  Result add_ref(void* block) noexcept;
  /// Drops a reference; the block is free again when the count reaches 0.
  Result release(void* block) noexcept;

  /// True when `p` is the start of one of this pool's blocks.
  bool owns(const void* p) const noexcept { return index_of(p) >= 0; }
  /// Reference count of a block (0 when free or foreign).
  std::uint32_t ref_count(const void* block) const noexcept;

  std::size_t block_size() const noexcept { return block_size_; }
  std::size_t capacity() const noexcept { return count_; }
  std::size_t in_use() const noexcept { return in_use_; }
  std::size_t available() const noexcept { return count_ - in_use_; }
  /// Most blocks ever in use at once.
  std::size_t high_water() const noexcept { return high_water_; }

 private:
  friend class MessagePoolBase;  // walks its blocks (MessagePoolBase::detach)
  long index_of(const void* p) const noexcept;

  unsigned char* blocks_ = nullptr;
  std::uint32_t* refs_ = nullptr;  // per block: reference count, 0 = free
  std::uint32_t* next_ = nullptr;  // per block: next free block index
  std::size_t block_size_ = 0;
  std::size_t count_ = 0;
  std::size_t in_use_ = 0;
  std::size_t high_water_ = 0;
  std::uint32_t free_head_ = 0;  // index, or count_ when empty
};

/// A pool that carries its own storage: Count blocks of BlockSize bytes.
template <std::size_t BlockSize, std::size_t Count>
class Pool : public PoolBase {
  static_assert(BlockSize >= 1, "Pool block size must be at least 1");
  static_assert(Count >= 1 && Count <= (std::size_t{1} << 31), "Pool count must be 1..2^31");

 public:
  Pool() noexcept {
    Result r = init(storage_, BlockSize, Count, meta_);
    LEMSG_ASSERT(r == Result::Ok);
    (void)r;
  }

 private:
  alignas(PoolBase::alignment) unsigned char storage_[PoolBase::round_block(BlockSize) * Count];
  std::uint32_t meta_[PoolBase::meta_words(Count)];
};

/// Holds a callable with signature Sig (a lambda, functor or function
/// pointer) in place, without heap. A callable larger than Size bytes is a
/// compile-time error. An empty Callable is false; calling it asserts.
template <typename Sig, std::size_t Size = LEMSG_CALLABLE_SIZE, bool Copyable = true>
class Callable;

/// Copyable = false makes a move-only Callable, which may hold a move-only
/// function object (one that owns a Message or a Responder).
template <typename R, typename... A, std::size_t Size, bool Copyable>
class Callable<R(A...), Size, Copyable> {
 public:
  Callable() noexcept = default;
  Callable(std::nullptr_t) noexcept {}

  template <typename F, typename Fn = std::decay_t<F>,
            typename = std::enable_if_t<!std::is_same<Fn, Callable>::value &&
                                        std::is_invocable_r<R, Fn&, A...>::value>>
  Callable(F&& f) noexcept {
    static_assert(sizeof(Fn) <= Size,
                  "lemsg: this handler captures more than LEMSG_CALLABLE_SIZE bytes; "
                  "capture one pointer to a struct instead, or raise LEMSG_CALLABLE_SIZE");
    static_assert(alignof(Fn) <= alignof(std::max_align_t), "lemsg: handler is over-aligned");
    static_assert(std::is_nothrow_move_constructible<Fn>::value, "lemsg: handler must move without throwing");
    static_assert(!Copyable || std::is_copy_constructible<Fn>::value,
                  "lemsg: this handler cannot be copied (it owns a move-only object); only a response handler may");
    // A null function pointer makes an empty Callable. A function passed by
    // name (F is a function reference) is never null, and gcc's
    // -Wnonnull-compare rejects testing it, so only real pointers are tested.
    if constexpr ((std::is_pointer<Fn>::value || std::is_member_pointer<Fn>::value) &&
                  !std::is_function<std::remove_reference_t<F>>::value) {
      if (f == nullptr) return;
    }
    ::new (static_cast<void*>(buf_)) Fn(std::forward<F>(f));
    invoke_ = &invoke_as<Fn>;
    if constexpr (!std::is_trivially_copyable<Fn>::value) manage_ = &manage_as<Fn>;
  }

  Callable(const Callable& o) noexcept { copy_from(o); }
  Callable(Callable&& o) noexcept { move_from(o); }
  Callable& operator=(const Callable& o) noexcept {
    static_assert(Copyable, "lemsg: this Callable is move-only");
    if (this != &o) {
      reset();
      copy_from(o);
    }
    return *this;
  }
  Callable& operator=(Callable&& o) noexcept {
    if (this != &o) {
      reset();
      move_from(o);
    }
    return *this;
  }
  Callable& operator=(std::nullptr_t) noexcept {
    reset();
    return *this;
  }
  ~Callable() { reset(); }

  explicit operator bool() const noexcept { return invoke_ != nullptr; }

  R operator()(A... args) const {
    LEMSG_ASSERT(invoke_ != nullptr);
    return invoke_(buf_, std::forward<A>(args)...);
  }

 private:
  enum class Op { Copy, Move, Destroy };
  using Invoke = R (*)(void*, A&&...);
  using Manage = void (*)(Op, void* dst, void* src);

  template <typename Fn>
  static R invoke_as(void* p, A&&... args) {
    return (*static_cast<Fn*>(p))(std::forward<A>(args)...);
  }
  template <typename Fn>
  static void manage_as(Op op, void* dst, void* src) {
    switch (op) {
      case Op::Copy:
        if constexpr (Copyable) ::new (dst) Fn(*static_cast<const Fn*>(src));
        break;
      case Op::Move: ::new (dst) Fn(std::move(*static_cast<Fn*>(src))); break;
      case Op::Destroy: static_cast<Fn*>(dst)->~Fn(); break;
    }
  }
  void reset() noexcept {
    if (manage_) manage_(Op::Destroy, buf_, nullptr);
    invoke_ = nullptr;
    manage_ = nullptr;
  }
  void copy_from(const Callable& o) noexcept {
    static_assert(Copyable, "lemsg: this Callable is move-only");
    if (o.manage_) o.manage_(Op::Copy, buf_, o.buf_);
    else std::memcpy(buf_, o.buf_, Size);
    invoke_ = o.invoke_;
    manage_ = o.manage_;
  }
  void move_from(Callable& o) noexcept {
    if (o.manage_) o.manage_(Op::Move, buf_, o.buf_);
    else std::memcpy(buf_, o.buf_, Size);
    invoke_ = o.invoke_;
    manage_ = o.manage_;
    o.reset();
  }

  alignas(std::max_align_t) mutable unsigned char buf_[Size] = {};
  Invoke invoke_ = nullptr;
  Manage manage_ = nullptr;
};

// -- implementation --

inline Result PoolBase::init(void* blocks, std::size_t block_size, std::size_t count,
                             std::uint32_t* meta) noexcept {
  if (blocks_ != nullptr || blocks == nullptr || meta == nullptr || block_size == 0 || count == 0 ||
      count > (std::size_t{1} << 31) ||
      reinterpret_cast<std::uintptr_t>(blocks) % alignment != 0)
    return Result::BadParameter;
  blocks_ = static_cast<unsigned char*>(blocks);
  refs_ = meta;
  next_ = meta + count;
  block_size_ = round_block(block_size);
  count_ = count;
  for (std::size_t i = 0; i < count; ++i) {
    refs_[i] = 0;
    next_[i] = static_cast<std::uint32_t>(i + 1);
  }
  free_head_ = 0;
  in_use_ = 0;
  high_water_ = 0;
  return Result::Ok;
}

inline long PoolBase::index_of(const void* p) const noexcept {
  // Compare as integers: pointer comparison across objects is unspecified.
  const std::uintptr_t base = reinterpret_cast<std::uintptr_t>(blocks_);
  const std::uintptr_t at = reinterpret_cast<std::uintptr_t>(p);
  if (blocks_ == nullptr || at < base) return -1;
  const std::uintptr_t off = at - base;
  if (off / block_size_ >= count_ || off % block_size_ != 0) return -1;
  return static_cast<long>(off / block_size_);
}

inline Result PoolBase::alloc(void*& out) noexcept {
  out = nullptr;
  if (free_head_ >= count_) return Result::PoolEmpty;
  const std::uint32_t i = free_head_;
  free_head_ = next_[i];
  refs_[i] = 1;
  if (++in_use_ > high_water_) high_water_ = in_use_;
  out = blocks_ + static_cast<std::size_t>(i) * block_size_;
  return Result::Ok;
}

inline Result PoolBase::add_ref(void* block) noexcept {
  const long i = index_of(block);
  if (i < 0) return Result::NotPoolBlock;
  if (refs_[i] == 0) return Result::DoubleFree;
  if (refs_[i] == UINT32_MAX) return Result::BadParameter;
  ++refs_[i];
  return Result::Ok;
}

inline Result PoolBase::release(void* block) noexcept {
  const long i = index_of(block);
  if (i < 0) return Result::NotPoolBlock;
  if (refs_[i] == 0) return Result::DoubleFree;
  if (--refs_[i] == 0) {
    next_[i] = free_head_;
    free_head_ = static_cast<std::uint32_t>(i);
    --in_use_;
  }
  return Result::Ok;
}

inline std::uint32_t PoolBase::ref_count(const void* block) const noexcept {
  const long i = index_of(block);
  return i < 0 ? 0 : refs_[i];
}

// =============================================================================
// 4. Safe reference tables                                            >>refmap
// =============================================================================

/// The part of RefMap that does not depend on its capacity, so code can take
/// any RefMap by reference without templating on N.
///
/// A reference is (generation << index_bits | slot index), XOR a key unique
/// to each map, so it is never 0 and a reference from another map decodes to
/// a wrong slot or generation (it could resolve only by matching a live
/// entry's full 32-bit value by chance: about size() in 2^32). Each slot counts its generations from 1 to the
/// map's maximum; when a slot has used its last generation it is retired for
/// good instead of wrapping, so no reference value is ever handed out twice
/// by one map and a stale reference can never resolve. Free slots are reused
/// oldest first, which spreads generations over all slots: a map hands out
/// about 2^32 references in its life before add() returns NoMemory for good.
/// Not thread-safe: a map belongs to one thread.
class RefMapBase {
 public:
  /// Called by release_owner() for each entry it removes.
  using ReleaseFn = void (*)(void* obj, std::uint32_t ref, void* ctx);

  RefMapBase(const RefMapBase&) = delete;
  RefMapBase& operator=(const RefMapBase&) = delete;

  /// Stores `obj` (not nullptr) with an optional owner key (0 = no owner).
  /// Ok with `ref` set, BadParameter for nullptr, NoMemory when full.
  Result add_ptr(void* obj, std::uint32_t& ref, std::uint32_t owner = 0) noexcept;
  /// The object for `ref`, or nullptr when it is 0, stale, forged or foreign.
  void* lookup_ptr(std::uint32_t ref) const noexcept;
  /// Removes the entry: Ok, or NotFound when `ref` does not resolve.
  Result remove(std::uint32_t ref) noexcept;
  /// The owner key of a live entry, 0 when none or when `ref` does not resolve.
  std::uint32_t owner_of(std::uint32_t ref) const noexcept;
  /// Removes every entry whose owner is `owner` (not 0), calling `fn` (may be
  /// nullptr) for each after it is removed. Returns how many were removed.
  std::size_t release_owner_ptr(std::uint32_t owner, ReleaseFn fn, void* ctx) noexcept;

  std::size_t size() const noexcept { return size_; }
  std::size_t capacity() const noexcept { return capacity_; }
  /// Most entries ever live at once.
  std::size_t high_water() const noexcept { return high_water_; }
  /// Slots retired because their generations ran out.
  std::size_t retired() const noexcept { return retired_; }
  /// Largest generation a slot reaches before it retires.
  std::uint32_t max_generation() const noexcept { return max_gen_; }

 protected:
  struct Slot {
    void* obj;
    std::uint32_t gen;    // generation of the live entry, or of the last one
    std::uint32_t owner;  // owner key, 0 = none
    std::uint32_t next;   // next free slot (FIFO), when free
  };

  RefMapBase(Slot* slots, std::size_t capacity, std::uint32_t max_gen, bool wrap = false) noexcept;

  std::uint32_t encode(std::uint32_t index, std::uint32_t gen) const noexcept {
    return ((gen << index_bits_) | index) ^ key_;
  }
  Slot* resolve(std::uint32_t ref) const noexcept;

  template <typename F>
  void each_live(F&& f) const noexcept {
    // Stop at the last live entry: the Loop walks its tables on every
    // dispatch, and they are mostly empty.
    std::size_t left = size_;
    for (std::size_t i = 0; left && i < capacity_; ++i)
      if (slots_[i].obj) {
        --left;
        f(slots_[i].obj, encode(static_cast<std::uint32_t>(i), slots_[i].gen));
      }
  }

 private:
  static std::uint32_t next_key() noexcept;
  void push_free(std::uint32_t index) noexcept;

  Slot* slots_;
  std::size_t capacity_;
  std::size_t size_ = 0;
  std::size_t high_water_ = 0;
  std::size_t retired_ = 0;
  std::uint32_t max_gen_;
  bool wrap_;  // at max_gen_ a slot starts again at generation 1 instead of retiring
  std::uint32_t index_bits_;
  std::uint32_t key_;
  std::uint32_t free_head_;  // capacity_ when no free slot
  std::uint32_t free_tail_;
};

namespace detail {
constexpr std::uint32_t index_bits_for(std::size_t n) noexcept {
  std::uint32_t b = 0;
  while ((std::size_t{1} << b) < n) ++b;
  return b;
}
constexpr std::uint32_t max_generation_for(std::size_t n) noexcept {
  return index_bits_for(n) == 0 ? UINT32_MAX : (UINT32_MAX >> index_bits_for(n));
}
}  // namespace detail

/// Table of opaque references to objects of type T; at most N live at once.
/// A reference is slot index + generation, so a stale, forged or foreign
/// reference looks up as nullptr. Not thread-safe: it belongs to one Loop.
/// MaxGeneration (default: every value the index leaves room for) bounds the
/// generations of a slot before it retires; tests lower it to reach the end.
/// With Wrap, a slot that used them all starts again at generation 1 instead
/// of retiring, so the map never runs out; a reference kept stale across all
/// of its slot's generations could then resolve to a newer entry. The
/// library's own handle tables wrap (a long-running service must not run
/// out of WatchIds or SessionRefs); a user's map retires unless it asks.
/// add(): Ok, BadParameter for nullptr, or NoMemory when the table is full (raise N).
template <typename T, std::size_t N, std::uint32_t MaxGeneration = detail::max_generation_for(N), bool Wrap = false>
class RefMap : public RefMapBase {
  static_assert(N >= 1 && N <= (std::size_t{1} << 24), "RefMap capacity must be 1..2^24");
  static_assert(MaxGeneration >= 1 && MaxGeneration <= detail::max_generation_for(N),
                "RefMap MaxGeneration must fit beside the slot index in 32 bits");

 public:
  RefMap() noexcept : RefMapBase(slots_, N, MaxGeneration, Wrap) {}

  Result add(T* obj, std::uint32_t& ref, std::uint32_t owner = 0) noexcept { return add_ptr(obj, ref, owner); }
  T* lookup(std::uint32_t ref) const noexcept { return static_cast<T*>(lookup_ptr(ref)); }

  /// Removes every entry owned by `owner`, calling f(T*, uint32_t ref) for each.
  template <typename F>
  std::size_t release_owner(std::uint32_t owner, F&& f) noexcept {
    auto thunk = [](void* obj, std::uint32_t ref, void* ctx) {
      (*static_cast<std::remove_reference_t<F>*>(ctx))(static_cast<T*>(obj), ref);
    };
    // ctx is void*: strip const so a const callable can be passed too; the
    // thunk casts back to the callable's own (possibly const) type.
    return release_owner_ptr(owner, thunk, const_cast<void*>(static_cast<const void*>(&f)));
  }
  /// Removes every entry owned by `owner` without a callback.
  std::size_t release_owner(std::uint32_t owner) noexcept { return release_owner_ptr(owner, nullptr, nullptr); }

  /// Calls f(T*, uint32_t ref) for every live entry. f must not add or remove.
  template <typename F>
  void for_each(F&& f) const noexcept {
    each_live([&](void* obj, std::uint32_t ref) { f(static_cast<T*>(obj), ref); });
  }

 private:
  Slot slots_[N];
};

namespace detail {
// The library's own handle tables (Loop watches and timers, a Service's
// sessions and handshakes): their generations wrap (LEMSG_HANDLE_GENERATIONS
// of them per slot), so no number of opens, closes or timers ever uses them
// up.
constexpr std::uint32_t handle_generations(std::size_t n, unsigned long long want = LEMSG_HANDLE_GENERATIONS) noexcept {
  return want == 0 || want > max_generation_for(n) ? max_generation_for(n) : static_cast<std::uint32_t>(want);
}
template <typename T, std::size_t N>
using HandleMap = RefMap<T, N, handle_generations(N), true>;
}  // namespace detail

// -- implementation --

inline std::uint32_t RefMapBase::next_key() noexcept {
  // Every map gets its own key; the odd multiplier spreads consecutive
  // counters over all 32 bits, so two maps' references decode differently.
  static std::atomic<std::uint32_t> counter{0x5eed};
  std::uint32_t k = counter.fetch_add(1, std::memory_order_relaxed) * 0x9E3779B1u;
  return k ^ (k >> 15);
}

inline RefMapBase::RefMapBase(Slot* slots, std::size_t capacity, std::uint32_t max_gen, bool wrap) noexcept
    : slots_(slots),
      capacity_(capacity),
      max_gen_(max_gen),
      wrap_(wrap),
      index_bits_(detail::index_bits_for(capacity)),
      key_(next_key()),
      free_head_(static_cast<std::uint32_t>(capacity)),
      free_tail_(static_cast<std::uint32_t>(capacity)) {
  for (std::size_t i = 0; i < capacity; ++i) {
    slots_[i] = Slot{nullptr, 0, 0, 0};
    push_free(static_cast<std::uint32_t>(i));
  }
}

inline void RefMapBase::push_free(std::uint32_t index) noexcept {
  slots_[index].next = static_cast<std::uint32_t>(capacity_);
  if (free_head_ == capacity_) free_head_ = index;
  else slots_[free_tail_].next = index;
  free_tail_ = index;
}

inline Result RefMapBase::add_ptr(void* obj, std::uint32_t& ref, std::uint32_t owner) noexcept {
  ref = 0;
  if (obj == nullptr) return Result::BadParameter;
  while (free_head_ != capacity_) {
    const std::uint32_t i = free_head_;
    Slot& s = slots_[i];
    free_head_ = s.next;
    if (free_head_ == capacity_) free_tail_ = static_cast<std::uint32_t>(capacity_);
    // Skip the one generation whose encoding is 0: 0 is never a reference.
    std::uint32_t gen = s.gen + 1;
    if (gen <= max_gen_ && s.gen < max_gen_ && encode(i, gen) == 0) ++gen;
    const bool used_up = gen > max_gen_ || gen <= s.gen;
    if (used_up && wrap_) {
      // Generations used up in a map that must never run out: start again.
      gen = 1;
      if (encode(i, gen) == 0) ++gen;
    }
    if (gen > max_gen_ || (used_up && !wrap_)) {
      ++retired_;  // generations used up: never hand this slot out again
      continue;
    }
    s.gen = gen;
    s.obj = obj;
    s.owner = owner;
    ref = encode(i, gen);
    if (++size_ > high_water_) high_water_ = size_;
    return Result::Ok;
  }
  return Result::NoMemory;
}

inline RefMapBase::Slot* RefMapBase::resolve(std::uint32_t ref) const noexcept {
  if (ref == 0) return nullptr;
  const std::uint32_t v = ref ^ key_;
  const std::uint32_t index = index_bits_ == 0 ? 0 : (v & ((1u << index_bits_) - 1));
  const std::uint32_t gen = index_bits_ == 0 ? v : (v >> index_bits_);
  if (index >= capacity_) return nullptr;
  Slot& s = slots_[index];
  if (s.obj == nullptr || s.gen != gen) return nullptr;
  return &s;
}

inline void* RefMapBase::lookup_ptr(std::uint32_t ref) const noexcept {
  Slot* s = resolve(ref);
  return s ? s->obj : nullptr;
}

inline std::uint32_t RefMapBase::owner_of(std::uint32_t ref) const noexcept {
  Slot* s = resolve(ref);
  return s ? s->owner : 0;
}

inline Result RefMapBase::remove(std::uint32_t ref) noexcept {
  Slot* s = resolve(ref);
  if (!s) return Result::NotFound;
  s->obj = nullptr;
  s->owner = 0;
  --size_;
  push_free(static_cast<std::uint32_t>(s - slots_));
  return Result::Ok;
}

inline std::size_t RefMapBase::release_owner_ptr(std::uint32_t owner, ReleaseFn fn, void* ctx) noexcept {
  if (owner == 0) return 0;
  std::size_t n = 0;
  for (std::size_t i = 0; i < capacity_; ++i) {
    Slot& s = slots_[i];
    if (s.obj == nullptr || s.owner != owner) continue;
    void* obj = s.obj;
    const std::uint32_t ref = encode(static_cast<std::uint32_t>(i), s.gen);
    // Remove before the callback, so the callback sees the reference as dead
    // and may add entries (possibly into this very slot) safely.
    s.obj = nullptr;
    s.owner = 0;
    --size_;
    push_free(static_cast<std::uint32_t>(i));
    ++n;
    if (fn) fn(obj, ref, ctx);
  }
  return n;
}

// =============================================================================
// 5. Wire format                                                        >>wire
// =============================================================================
//
// Every frame is one SOCK_SEQPACKET datagram: a 16-byte header, then exactly
// `length` payload bytes. Both ends run on one device, so multi-byte fields
// are in host byte order.
//
//   byte  0      magic    0xE5
//   byte  1      version  1
//   byte  2      type     1 Hello, 2 Welcome, 3 Refuse, 4 Message,
//                         5 Request, 6 Response
//   byte  3      flags    bit 0: one fd rides with the frame (SCM_RIGHTS)
//                         bit 1: error; the payload is a 4-byte Result code
//                         other bits must be 0
//   bytes 4-7    txn      transaction id: non-zero on Request and Response,
//                         0 on every other type
//   bytes 8-11   length   payload bytes after the header
//   bytes 12-15  reserved must be 0
//   bytes 16-    payload
//
// Per type:
//   Hello    client -> server, first frame: u32 max payload, u32 id length,
//            then the protocol id (no NUL); length = 8 + id length.
//   Welcome  server -> client: the session is open; length 0.
//   Refuse   server -> client: error flag, u32 Result; the server then closes.
//   Message  either way, one-way; fd flag allowed.
//   Request  client -> server; fd flag allowed.
//   Response server -> client, answers a pending Request; fd flag allowed, or
//            error flag with a u32 Result (length 4).
//
// A receiver checks, before using anything: the datagram holds at least a
// header; magic, version, type, flags and reserved; `length` equals the bytes
// actually received minus the header (so it cannot overflow anything) and is
// at most the protocol maximum; txn agrees with the type. What the type may
// do in the current state, and whether txn is pending, is the messaging
// layer's check.
//
// Introspection (section 13). Two protocol ids are reserved; a Service
// answers them itself, before its protocol check, and only to uid 0 or its
// own uid (others: Refuse NotPermitted). Such a connection takes no session
// slot and runs no handler.
//   "lemsg.info"     Hello's max payload field is 0. The answer is one
//                    Message frame (txn 0, no fd) carrying the info record
//                    below, then the server closes.
//   "lemsg.monitor"  Hello's max payload field: payload bytes wanted per
//                    record (0 = none; the server sends at most
//                    LEMSG_MONITOR_PAYLOAD). Answer: Welcome, or Refuse
//                    (NotPermitted; Busy when LEMSG_MAX_MONITORS are
//                    attached). Then one Message frame per frame the service
//                    sends or receives, carrying a monitor record. The
//                    monitor sends nothing more: anything it sends, or its
//                    hang-up, detaches it.
//
// Info record (all fields u32 unless said; host byte order):
//   0  version (1)          4  mode (0 direct, 1 directory)
//   8  max payload         12  pool blocks in use
//  16  pool high water     20  pool capacity
//  24  name length N (0..LEMSG_MAX_NAME; 0 when not advertised)
//  28  protocol id length P (1..LEMSG_MAX_PROTOCOL_ID)
//  32  sessions S (0..LEMSG_MAX_SESSIONS)
//  36  monitors attached
//  40  counters: info_counter_count u64, in wire::InfoCounter order
//  info_fixed_size: the name (N bytes, no NUL), the protocol id (P bytes),
//      then S entries of 24 bytes: session ref, pid, uid, gid, requests
//      received and not yet answered, frames waiting in its send queue.
//  The record's length is exactly info_fixed_size + N + P + 24 S.
//
// Monitor record (28 bytes, then the payload bytes):
//   0  u64 time: CLOCK_MONOTONIC, ns, when the service handled the frame
//   8  u32 session ref
//  12  u8 direction (0 received by the service, 1 sent or queued by it)
//  13  u8 frame type (Message, Request or Response)
//  14  u8 frame flags (FlagFd, FlagError)
//  15  u8 reserved, 0
//  16  u32 txn             20  u32 the frame's payload bytes
//  24  u32 payload bytes that follow (at most what was asked for, the size
//      and LEMSG_MONITOR_PAYLOAD); the record's length is 28 + that.

namespace wire {

/// Bytes in a frame header.
constexpr std::size_t header_size = 16;
constexpr std::uint8_t magic = 0xE5;
constexpr std::uint8_t version = 1;

enum class FrameType : std::uint8_t { Hello = 1, Welcome, Refuse, Message, Request, Response };

enum : std::uint8_t { FlagFd = 1u << 0, FlagError = 1u << 1 };

/// The reserved protocol ids of the info query and the monitor.
constexpr char info_id[] = "lemsg.info";
constexpr char monitor_id[] = "lemsg.monitor";

/// The counters of the info record, in their order there.
enum InfoCounter : std::uint32_t {
  CountRequests,         // requests received
  CountResponses,        // responses sent (error responses included)
  CountMessagesIn,       // one-way messages received
  CountMessagesOut,      // one-way messages sent
  CountBadFrames,        // malformed frames and hellos received
  CountOpened,           // sessions opened
  CountRefused,          // connections refused (Refuse sent)
  CountMonitorsDropped,  // monitors dropped for not reading
  CountClosedByClient,   // sessions closed: Closed (the client closed or died)
  CountClosedHere,       // Ok (this side closed it)
  CountClosedBadFrame,   // BadFrame
  CountClosedTooLarge,   // TooLarge
  CountClosedOverflow,   // Overflow
  CountClosedStalled,    // Stalled
  CountClosedOther,      // any other reason
  info_counter_count
};
constexpr std::size_t info_fixed_size = 40 + 8 * info_counter_count;
constexpr std::size_t info_session_size = 24;
/// Longest info record.
constexpr std::size_t info_max_size =
    info_fixed_size + LEMSG_MAX_NAME + LEMSG_MAX_PROTOCOL_ID + info_session_size * LEMSG_MAX_SESSIONS;
constexpr std::size_t record_fixed_size = 28;

/// The decoded header.
struct Header {
  FrameType type = FrameType::Message;
  std::uint8_t flags = 0;
  std::uint32_t txn = 0;
  std::uint32_t length = 0;
};

/// Writes `h` into header_size bytes at `out`.
inline void encode(const Header& h, unsigned char* out) noexcept;

/// Decodes and checks a received datagram of `received` bytes whose payload
/// may be at most `max_payload` bytes. Ok, BadFrame (short, bad magic,
/// version, type, flags, reserved, length or txn), or TooLarge.
inline Result decode(const unsigned char* in, std::size_t received, std::uint32_t max_payload,
                     Header& out) noexcept;

// -- implementation --

inline void encode(const Header& h, unsigned char* out) noexcept {
  const std::uint32_t reserved = 0;
  out[0] = magic;
  out[1] = version;
  out[2] = static_cast<std::uint8_t>(h.type);
  out[3] = h.flags;
  std::memcpy(out + 4, &h.txn, 4);
  std::memcpy(out + 8, &h.length, 4);
  std::memcpy(out + 12, &reserved, 4);
}

inline Result decode(const unsigned char* in, std::size_t received, std::uint32_t max_payload,
                     Header& out) noexcept {
  if (in == nullptr || received < header_size) return Result::BadFrame;
  if (in[0] != magic || in[1] != version) return Result::BadFrame;
  if (in[2] < static_cast<std::uint8_t>(FrameType::Hello) || in[2] > static_cast<std::uint8_t>(FrameType::Response))
    return Result::BadFrame;
  std::uint32_t txn, length, reserved;
  std::memcpy(&txn, in + 4, 4);
  std::memcpy(&length, in + 8, 4);
  std::memcpy(&reserved, in + 12, 4);
  const std::uint8_t flags = in[3];
  if ((flags & ~(FlagFd | FlagError)) != 0 || reserved != 0) return Result::BadFrame;
  // Compare with what arrived, by subtraction that cannot wrap: received >= header_size here.
  if (length != received - header_size) return Result::BadFrame;
  const FrameType type = static_cast<FrameType>(in[2]);
  const bool has_txn = type == FrameType::Request || type == FrameType::Response;
  if (has_txn != (txn != 0)) return Result::BadFrame;
  const bool may_fd = type == FrameType::Message || type == FrameType::Request || type == FrameType::Response;
  if ((flags & FlagFd) && !may_fd) return Result::BadFrame;
  if (flags & FlagError) {
    if ((type != FrameType::Response && type != FrameType::Refuse) || length != 4 || (flags & FlagFd))
      return Result::BadFrame;
  } else if (type == FrameType::Refuse) {
    return Result::BadFrame;
  }
  if (type == FrameType::Welcome && length != 0) return Result::BadFrame;
  if (type == FrameType::Hello && (length < 8 || length > 8 + LEMSG_MAX_PROTOCOL_ID)) return Result::BadFrame;
  if (may_fd && !(flags & FlagError) && length > max_payload) return Result::TooLarge;
  out.type = type;
  out.flags = flags;
  out.txn = txn;
  out.length = length;
  return Result::Ok;
}

}  // namespace wire

// =============================================================================
// 6. Event loop                                                         >>loop
// =============================================================================

namespace detail {

// A plain pthread mutex for std::lock_guard. std::mutex::lock() reports a
// failure by throwing std::system_error, which links libstdc++'s exception
// runtime and its demangler into every static -fno-exceptions program (about
// 35 KiB of Thumb-2). Trivially destructible and constant-initialised, so a
// function-local static holding one needs no guard either.
class Mutex {
 public:
  constexpr Mutex() noexcept = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;
  void lock() noexcept {
    const int e = ::pthread_mutex_lock(&m_);
    LEMSG_ASSERT(e == 0);
    (void)e;
  }
  void unlock() noexcept { ::pthread_mutex_unlock(&m_); }

 private:
  pthread_mutex_t m_ = PTHREAD_MUTEX_INITIALIZER;
};

// The one clock of the library: CLOCK_MONOTONIC in nanoseconds.
inline std::int64_t now_ns() noexcept {
  struct timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}
// Whole milliseconds from `now` to `deadline` (both now_ns() values), rounded
// up so a poll() never wakes just before the deadline and spins; 0 when due.
inline int ms_between(std::int64_t now, std::int64_t deadline) noexcept {
  const std::int64_t left = deadline - now;
  if (left <= 0) return 0;
  const std::int64_t ms = (left + 999999) / 1000000;
  return ms > INT32_MAX ? INT32_MAX : static_cast<int>(ms);
}
inline int ms_until(std::int64_t deadline) noexcept { return ms_between(now_ns(), deadline); }

}  // namespace detail

/// A distinct handle type per kind of object, wrapping a uint32_t; 0 is never
/// valid, and handles of different kinds do not convert into each other.
template <typename Tag>
struct Handle {
  std::uint32_t value = 0;
  explicit operator bool() const noexcept { return value != 0; }
  friend bool operator==(Handle a, Handle b) noexcept { return a.value == b.value; }
  friend bool operator!=(Handle a, Handle b) noexcept { return a.value != b.value; }
};
using WatchId = Handle<struct WatchTag>;
using TimerId = Handle<struct TimerTag>;

/// Interest bits for Loop::add_watch and Loop::set_events.
enum : short { Readable = POLLIN, Writable = POLLOUT };

/// Called with the fd and poll()'s revents (which may include POLLHUP,
/// POLLERR and POLLNVAL whatever the interest).
using WatchHandler = Callable<void(int fd, short revents)>;
using TimerHandler = Callable<void()>;
using PostedFn = Callable<void()>;

/// One thread's poll() loop: fd watches (at most LEMSG_MAX_WATCHES), timers on
/// CLOCK_MONOTONIC (at most LEMSG_MAX_TIMERS), and a queue of functions posted
/// from other threads (at most LEMSG_MAX_POSTED waiting), woken by an eventfd.
///
/// Thread: everything but post() and stop() must be called on the thread that
/// runs the loop. Handlers run there too. A handler may add or remove any
/// watch or timer, itself included; a removed one is never called again, and
/// the handler that is running stays valid until it returns (it runs in
/// place, and a slot removed while its handler runs is freed, for reuse,
/// only when that handler returns).
///
/// Timers: earliest deadline first; equal deadlines fire in the order they
/// were armed. A repeating timer that falls behind skips the missed ticks
/// instead of firing in a burst. A timer armed during dispatch fires in a
/// later dispatch at the earliest, so a zero delay cannot starve the loop.
///
/// Dispatch does not nest: run(), run_once(), fill_pollfds() and dispatch()
/// called from inside one of this loop's handlers return Reentrant.
///
/// Lifetime: a Loop must outlive every Service and Session created on it.
/// Destroying it first is a bug the Loop's destructor stops at: it logs the
/// mistake and fails LEMSG_ASSERT.
class Loop {
 public:
  Loop() noexcept;
  ~Loop();
  Loop(const Loop&) = delete;
  Loop& operator=(const Loop&) = delete;

  /// Ok when the loop's eventfd could be created; otherwise SystemError and
  /// post() fails (watches and timers still work).
  Result status() const noexcept { return wake_fd_ >= 0 ? Result::Ok : Result::SystemError; }

  // -- fd watches --
  /// Watches `fd` (>= 0) for `events` (Readable | Writable, or 0 for errors
  /// only). Ok, BadParameter (negative fd, empty handler, unknown bits),
  /// WatchTableFull.
  Result add_watch(int fd, short events, WatchHandler handler, WatchId& out) noexcept;
  /// Changes the interest of a watch: Ok, NotFound, BadParameter.
  Result set_events(WatchId id, short events) noexcept;
  /// Stops watching; does not close the fd. Ok or NotFound.
  Result remove_watch(WatchId id) noexcept;

  // -- timers --
  /// Creates a disarmed timer. Ok, BadParameter (empty handler), TimerTableFull.
  Result add_timer(TimerHandler handler, TimerId& out) noexcept;
  /// (Re)arms: first fires after `delay_ms`, then every `period_ms` (0 = once;
  /// a one-shot timer is disarmed, not removed, when it fires). Ok or NotFound.
  Result arm_timer(TimerId id, std::uint32_t delay_ms, std::uint32_t period_ms = 0) noexcept;
  /// Disarms without removing. Ok or NotFound.
  Result disarm_timer(TimerId id) noexcept;
  /// Removes the timer. Ok or NotFound.
  Result remove_timer(TimerId id) noexcept;
  /// True when the timer exists and is armed.
  bool is_armed(TimerId id) const noexcept;

  // -- other threads --
  /// Queues `fn` to run on the loop's thread; never blocks. Any thread.
  /// Ok, BadParameter (empty), QueueFull, SystemError (no eventfd).
  Result post(PostedFn fn) noexcept;
  /// Makes run() return after the current dispatch. Any thread, or a handler.
  /// A stop() while run() is not running makes the next run() return at once.
  void stop() noexcept;

  // -- running --
  /// Dispatches until stop(). Ok, SystemError when poll() fails, or
  /// Reentrant when called from inside one of this loop's handlers.
  Result run() noexcept;
  /// Waits at most `timeout_ms` (-1 = no limit, 0 = do not wait) for events,
  /// then dispatches them. Ok when something was dispatched, Timeout when
  /// nothing was, SystemError when poll() fails, Reentrant when called from
  /// inside one of this loop's handlers. EINTR counts as nothing.
  Result run_once(int timeout_ms) noexcept;

  // -- embedding in another loop --
  /// pollfd entries fill_pollfds() writes (the wake-up eventfd included).
  std::size_t pollfd_count() const noexcept;
  /// Writes the loop's fds and interests into `fds`. Ok with `count` set,
  /// BadParameter when `capacity` < pollfd_count() (count says how many), or
  /// Reentrant from inside one of this loop's handlers.
  Result fill_pollfds(struct pollfd* fds, std::size_t capacity, std::size_t& count) noexcept;
  /// Milliseconds until the next timer is due (0 when one is due or posted
  /// work waits, -1 when nothing is scheduled). Use as poll()'s timeout.
  int next_timeout_ms() const noexcept;
  /// Runs the handlers for the revents of the array from the last
  /// fill_pollfds() (same order, same count), then due timers.
  /// Ok when a handler ran, Timeout when nothing was ready or due;
  /// BadParameter when `count` does not match that fill; Reentrant from
  /// inside one of this loop's handlers (nothing is dispatched).
  Result dispatch(const struct pollfd* fds, std::size_t count) noexcept;

  /// True on the thread that last dispatched the loop, through run(),
  /// run_once() or dispatch(); false everywhere before the first dispatch
  /// (the thread that builds a loop is often not the one that runs it).
  /// Any thread may ask (the messaging layer asks from a caller's thread).
  bool on_owner_thread() const noexcept {
    return owned_.load(std::memory_order_acquire) != 0 &&
           pthread_equal(owner_.load(std::memory_order_relaxed), pthread_self()) != 0;
  }

  std::size_t watch_count() const noexcept { return watch_refs_.size(); }
  std::size_t timer_count() const noexcept { return timer_refs_.size(); }

 private:
  friend class Service;
  friend class Session;
  struct Watch {
    int fd = -1;
    short events = 0;
    bool used = false;
    bool doomed = false;  // removed while its handler runs: freed when it returns
    WatchHandler handler;
  };
  struct Timer {
    std::int64_t deadline_ns = 0;
    std::int64_t period_ns = 0;
    std::uint64_t seq = 0;  // arming order, breaks deadline ties
    bool armed = false;
    bool used = false;
    bool doomed = false;  // removed while its handler runs
    TimerHandler handler;
  };
  static constexpr std::int64_t no_deadline = INT64_MAX;

  bool dispatch_fds(const struct pollfd* fds, std::size_t count) noexcept;
  bool dispatch_timers() noexcept;
  bool dispatch_posted() noexcept;
  Result dispatch_filled(const struct pollfd* fds, std::size_t count) noexcept;
  void write_pollfds(struct pollfd* fds) noexcept;
  // The earliest armed deadline (no_deadline when none), scanned for only
  // after a change that may have moved it back.
  std::int64_t earliest() const noexcept;
  void timer_moved(const Timer& t) noexcept {
    if (t.armed && t.deadline_ns <= earliest_ns_) earliest_dirty_ = true;
  }

  Watch watches_[LEMSG_MAX_WATCHES];
  detail::HandleMap<Watch, LEMSG_MAX_WATCHES> watch_refs_;
  Timer timers_[LEMSG_MAX_TIMERS];
  detail::HandleMap<Timer, LEMSG_MAX_TIMERS> timer_refs_;
  std::uint64_t arm_seq_ = 0;

  // Snapshot from the last fill: which watch each pollfd entry belongs to.
  // run_once() keeps pfds_ (and filled_) from one wait to the next and
  // writes them again only after a watch was added or removed; set_events()
  // changes its entry in place.
  struct pollfd pfds_[LEMSG_MAX_WATCHES + 1];
  std::uint32_t filled_[LEMSG_MAX_WATCHES + 1];
  std::size_t filled_count_ = 0;  // entries the next dispatch() must match
  std::size_t pfds_count_ = 0;    // entries of pfds_ when current
  bool pfds_current_ = false;
  Watch* running_watch_ = nullptr;
  Timer* running_timer_ = nullptr;
  // Timers: the earliest armed deadline, valid unless earliest_dirty_; and
  // the clock as the last dispatch of timers read it, which the wait that
  // follows it starts from (one clock read per turn of run()).
  mutable std::int64_t earliest_ns_ = no_deadline;
  mutable bool earliest_dirty_ = false;
  std::int64_t now_hint_ = 0;
  bool has_now_hint_ = false;
  bool in_run_ = false;  // run() turns without a pause between dispatch and wait

  int wake_fd_ = -1;
  detail::Mutex post_mutex_;
  PostedFn posted_[LEMSG_MAX_POSTED];
  std::size_t post_head_ = 0;
  std::size_t post_count_ = 0;  // guarded by post_mutex_
  std::atomic<int> posted_pending_{0};
  bool posted_ran_ = false;  // the queue already ran in this dispatch
  std::atomic<int> stop_{0};
  // The thread that dispatches the loop: written by each dispatch, read by
  // any thread. owned_ stays 0 until the first dispatch.
  std::atomic<pthread_t> owner_{pthread_t{}};
  std::atomic<int> owned_{0};
  void claim_owner() noexcept {
    owner_.store(pthread_self(), std::memory_order_relaxed);
    owned_.store(1, std::memory_order_release);
  }
  bool dispatching_ = false;  // a handler of this loop is running
  std::size_t users_ = 0;     // Services and Sessions on this loop
};

// -- implementation --

inline Loop::Loop() noexcept {
  wake_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake_fd_ < 0) LEMSG_LOG(Error, "loop: eventfd failed: %s", std::strerror(errno));
}

inline Loop::~Loop() {
  if (users_ != 0)
    LEMSG_LOG(Error, "Loop destroyed before the %lu Service/Session objects on it; destroy them first",
              static_cast<unsigned long>(users_));
  LEMSG_ASSERT(users_ == 0);
  if (wake_fd_ >= 0) ::close(wake_fd_);
}

inline Result Loop::add_watch(int fd, short events, WatchHandler handler, WatchId& out) noexcept {
  out = WatchId{};
  if (fd < 0 || !handler || (events & ~(Readable | Writable)) != 0) return Result::BadParameter;
  for (Watch& w : watches_) {
    if (w.used) continue;
    std::uint32_t ref = 0;
    if (watch_refs_.add(&w, ref) != Result::Ok) return Result::WatchTableFull;
    w.fd = fd;
    w.events = events;
    w.used = true;
    w.handler = std::move(handler);
    out.value = ref;
    pfds_current_ = false;
    return Result::Ok;
  }
  return Result::WatchTableFull;
}

inline Result Loop::set_events(WatchId id, short events) noexcept {
  if ((events & ~(Readable | Writable)) != 0) return Result::BadParameter;
  Watch* w = watch_refs_.lookup(id.value);
  if (!w) return Result::NotFound;
  if (w->events == events) return Result::Ok;
  w->events = events;
  if (pfds_current_) {
    for (std::size_t i = 0; i < pfds_count_; ++i) {
      if (filled_[i] == id.value) {
        pfds_[i].events = events;
        break;
      }
    }
  }
  return Result::Ok;
}

inline Result Loop::remove_watch(WatchId id) noexcept {
  Watch* w = watch_refs_.lookup(id.value);
  if (!w) return Result::NotFound;
  Result r = watch_refs_.remove(id.value);
  pfds_current_ = false;
  w->fd = -1;
  if (w == running_watch_) {
    w->doomed = true;  // the handler running is this one: free the slot when it returns
    return r;
  }
  w->used = false;
  w->handler = nullptr;
  return r;
}

inline Result Loop::add_timer(TimerHandler handler, TimerId& out) noexcept {
  out = TimerId{};
  if (!handler) return Result::BadParameter;
  for (Timer& t : timers_) {
    if (t.used) continue;
    std::uint32_t ref = 0;
    if (timer_refs_.add(&t, ref) != Result::Ok) return Result::TimerTableFull;
    t.used = true;
    t.doomed = false;
    t.armed = false;
    t.handler = std::move(handler);
    out.value = ref;
    return Result::Ok;
  }
  return Result::TimerTableFull;
}

inline Result Loop::arm_timer(TimerId id, std::uint32_t delay_ms, std::uint32_t period_ms) noexcept {
  Timer* t = timer_refs_.lookup(id.value);
  if (!t) return Result::NotFound;
  timer_moved(*t);
  t->deadline_ns = detail::now_ns() + static_cast<std::int64_t>(delay_ms) * 1000000;
  t->period_ns = static_cast<std::int64_t>(period_ms) * 1000000;
  t->seq = ++arm_seq_;
  t->armed = true;
  if (t->deadline_ns < earliest_ns_) earliest_ns_ = t->deadline_ns;
  return Result::Ok;
}

inline Result Loop::disarm_timer(TimerId id) noexcept {
  Timer* t = timer_refs_.lookup(id.value);
  if (!t) return Result::NotFound;
  timer_moved(*t);
  t->armed = false;
  return Result::Ok;
}

inline Result Loop::remove_timer(TimerId id) noexcept {
  Timer* t = timer_refs_.lookup(id.value);
  if (!t) return Result::NotFound;
  timer_moved(*t);
  Result r = timer_refs_.remove(id.value);
  t->armed = false;
  if (t == running_timer_) {
    t->doomed = true;  // freed when its running handler returns
    return r;
  }
  t->used = false;
  t->handler = nullptr;
  return r;
}

inline bool Loop::is_armed(TimerId id) const noexcept {
  const Timer* t = timer_refs_.lookup(id.value);
  return t && t->armed;
}

inline Result Loop::post(PostedFn fn) noexcept {
  if (!fn) return Result::BadParameter;
  if (wake_fd_ < 0) return Result::SystemError;
  bool was_empty;
  {
    std::lock_guard<detail::Mutex> lock(post_mutex_);
    if (post_count_ == LEMSG_MAX_POSTED) return Result::QueueFull;
    posted_[(post_head_ + post_count_) % LEMSG_MAX_POSTED] = std::move(fn);
    was_empty = post_count_++ == 0;
    posted_pending_.store(1, std::memory_order_relaxed);
  }
  // Only the push onto an empty queue needs a wake-up: the loop drains what
  // it finds after each wake-up.
  if (was_empty) {
    const std::uint64_t one = 1;
    if (::write(wake_fd_, &one, sizeof one) < 0 && errno != EAGAIN) return Result::SystemError;
  }
  return Result::Ok;
}

inline void Loop::stop() noexcept {
  stop_.store(1, std::memory_order_release);
  if (wake_fd_ >= 0) {
    const std::uint64_t one = 1;
    ssize_t n = ::write(wake_fd_, &one, sizeof one);
    (void)n;  // EAGAIN means a wake-up is already pending
  }
}

inline bool Loop::dispatch_posted() noexcept {
  std::uint64_t drained;
  while (::read(wake_fd_, &drained, sizeof drained) < 0 && errno == EINTR) {
  }
  // Run only what was queued when we started, so a posted function that
  // posts again cannot keep this dispatch going forever.
  std::size_t n;
  {
    std::lock_guard<detail::Mutex> lock(post_mutex_);
    n = post_count_;
  }
  bool any = false;
  for (std::size_t i = 0; i < n; ++i) {
    PostedFn fn;
    {
      std::lock_guard<detail::Mutex> lock(post_mutex_);
      fn = std::move(posted_[post_head_]);
      post_head_ = (post_head_ + 1) % LEMSG_MAX_POSTED;
      --post_count_;
      if (post_count_ == 0) posted_pending_.store(0, std::memory_order_relaxed);
    }
    fn();
    any = true;
  }
  bool more;
  {
    std::lock_guard<detail::Mutex> lock(post_mutex_);
    more = post_count_ != 0;
  }
  if (more) {
    // Functions posted while we ran saw a non-empty queue and did not wake
    // us; wake ourselves so they run in the next dispatch.
    const std::uint64_t one = 1;
    ssize_t w = ::write(wake_fd_, &one, sizeof one);
    (void)w;
  }
  return any;
}

inline std::size_t Loop::pollfd_count() const noexcept {
  return watch_refs_.size() + (wake_fd_ >= 0 ? 1 : 0);
}

inline Result Loop::fill_pollfds(struct pollfd* fds, std::size_t capacity, std::size_t& count) noexcept {
  count = pollfd_count();
  // A fill from a handler would overwrite the snapshot being dispatched.
  if (dispatching_) return Result::Reentrant;
  if (fds == nullptr || capacity < count) {
    filled_count_ = 0;  // a later dispatch() must not match an older fill
    return Result::BadParameter;
  }
  write_pollfds(fds);
  // filled_ now describes the caller's array, not pfds_.
  if (fds != pfds_) pfds_current_ = false;
  filled_count_ = count;
  return Result::Ok;
}

inline void Loop::write_pollfds(struct pollfd* fds) noexcept {
  std::size_t n = 0;
  if (wake_fd_ >= 0) {
    fds[n] = pollfd{wake_fd_, POLLIN, 0};
    filled_[n++] = 0;  // 0 marks the wake-up fd
  }
  watch_refs_.for_each([&](Watch* w, std::uint32_t ref) {
    fds[n] = pollfd{w->fd, w->events, 0};
    filled_[n++] = ref;
  });
}

inline std::int64_t Loop::earliest() const noexcept {
  if (earliest_dirty_) {
    std::int64_t e = no_deadline;
    timer_refs_.for_each([&](const Timer* t, std::uint32_t) {
      if (t->armed && t->deadline_ns < e) e = t->deadline_ns;
    });
    earliest_ns_ = e;
    earliest_dirty_ = false;
  }
  return earliest_ns_;
}

inline int Loop::next_timeout_ms() const noexcept {
  if (posted_pending_.load(std::memory_order_relaxed)) return 0;
  const std::int64_t e = earliest();
  if (e == no_deadline) return -1;
  return detail::ms_until(e);
}

inline bool Loop::dispatch_fds(const struct pollfd* fds, std::size_t count) noexcept {
  bool any = false;
  for (std::size_t i = 0; i < count; ++i) {
    if (fds[i].revents == 0) continue;
    if (filled_[i] == 0) {
      posted_ran_ = true;
      any = dispatch_posted() || any;
      continue;
    }
    Watch* w = watch_refs_.lookup(filled_[i]);
    // Removed (or removed and replaced) by an earlier handler in this dispatch.
    if (!w) continue;
    const short rev = fds[i].revents;
    // In place: a handler that removes its own watch leaves the slot doomed,
    // and it is freed here once the handler has returned.
    running_watch_ = w;
    w->handler(w->fd, rev);
    running_watch_ = nullptr;
    any = true;
    if (w->doomed) {
      w->doomed = false;
      w->used = false;
      w->handler = nullptr;
      continue;
    }
    if ((rev & POLLNVAL) && watch_refs_.lookup(filled_[i]) == w) {
      LEMSG_LOG(Warning, "loop: fd %d is closed but still watched; removing the watch", w->fd);
      Result r = remove_watch(WatchId{filled_[i]});
      (void)r;
    }
  }
  return any;
}

inline bool Loop::dispatch_timers() noexcept {
  // Nothing armed: no clock to read, no table to scan.
  if (earliest() == no_deadline) return false;
  const std::int64_t now = detail::now_ns();
  now_hint_ = now;
  has_now_hint_ = true;  // still the time when no handler runs after this read
  if (earliest_ns_ > now) return false;
  has_now_hint_ = false;
  const std::uint64_t last_seq = arm_seq_;  // timers armed from here on wait
  bool any = false;
  for (;;) {
    Timer* due = nullptr;
    std::uint32_t due_ref = 0;
    timer_refs_.for_each([&](Timer* t, std::uint32_t ref) {
      if (!t->armed || t->deadline_ns > now || t->seq > last_seq) return;
      if (!due || t->deadline_ns < due->deadline_ns ||
          (t->deadline_ns == due->deadline_ns && t->seq < due->seq)) {
        due = t;
        due_ref = ref;
      }
    });
    if (!due) break;
    if (due->period_ns > 0) {
      due->deadline_ns += due->period_ns;
      if (due->deadline_ns <= now) due->deadline_ns = now + due->period_ns;
      due->seq = ++arm_seq_;  // also keeps it from firing twice in this pass
    } else {
      due->armed = false;
    }
    earliest_dirty_ = true;
    (void)due_ref;
    // In place, as watches are: a timer removed by its own handler is freed
    // when the handler returns.
    running_timer_ = due;
    due->handler();
    running_timer_ = nullptr;
    any = true;
    if (due->doomed) {
      due->doomed = false;
      due->used = false;
      due->handler = nullptr;
    }
  }
  return any;
}

inline Result Loop::dispatch(const struct pollfd* fds, std::size_t count) noexcept {
  if (dispatching_) return Result::Reentrant;
  if (count != filled_count_ || (count > 0 && fds == nullptr)) return Result::BadParameter;
  has_now_hint_ = false;  // the caller waited for as long as it liked
  // Whichever call drives the loop, the thread that dispatches it owns it
  // (run_once() claimed it before its wait).
  claim_owner();
  const Result r = dispatch_filled(fds, count);
  filled_count_ = 0;
  return r;
}

inline Result Loop::dispatch_filled(const struct pollfd* fds, std::size_t count) noexcept {
  // A nested dispatch would poll again and run handlers for the events this
  // one is still handing out, some twice for one event.
  dispatching_ = true;
  posted_ran_ = false;
  bool any = dispatch_fds(fds, count);
  if (!posted_ran_ && posted_pending_.load(std::memory_order_relaxed) && wake_fd_ >= 0) {
    // Work posted after the fill, whose wake-up this poll did not see. Only
    // when the queue did not run already: what a posted function posts waits
    // for the next dispatch.
    any = dispatch_posted() || any;
  }
  any = dispatch_timers() || any;
  dispatching_ = false;
  return any ? Result::Ok : Result::Timeout;
}

inline Result Loop::run_once(int timeout_ms) noexcept {
  if (dispatching_) return Result::Reentrant;
  // Owned from before the wait, so a synchronous call made on this thread
  // while it blocks in poll() is seen as this loop's.
  claim_owner();
  if (!pfds_current_) {
    write_pollfds(pfds_);
    pfds_count_ = pollfd_count();
    pfds_current_ = true;
  }
  filled_count_ = 0;  // a dispatch() of an earlier fill_pollfds() no longer matches
  const std::size_t n = pfds_count_;
  int wait = -1;
  if (posted_pending_.load(std::memory_order_relaxed)) {
    wait = 0;
  } else if (earliest() != no_deadline) {
    // The clock the last dispatch of timers read, when it is this turn's.
    wait = detail::ms_between(has_now_hint_ && in_run_ ? now_hint_ : detail::now_ns(), earliest_ns_);
  }
  has_now_hint_ = false;
  if (timeout_ms >= 0 && (wait < 0 || timeout_ms < wait)) wait = timeout_ms;
  const int rc = ::poll(pfds_, static_cast<nfds_t>(n), wait);
  if (rc < 0) {
    if (errno != EINTR) {
      LEMSG_LOG(Error, "loop: poll failed: %s", std::strerror(errno));
      return Result::SystemError;
    }
    for (std::size_t i = 0; i < n; ++i) pfds_[i].revents = 0;
  }
  return dispatch_filled(pfds_, n);
}

inline Result Loop::run() noexcept {
  if (dispatching_) return Result::Reentrant;
  has_now_hint_ = false;
  while (!stop_.load(std::memory_order_acquire)) {
    in_run_ = true;
    Result r = run_once(-1);
    in_run_ = false;
    if (r == Result::SystemError) {
      stop_.store(0, std::memory_order_relaxed);
      return r;
    }
  }
  stop_.store(0, std::memory_order_relaxed);
  return Result::Ok;
}

// =============================================================================
// 7. Transport                                                     >>transport
// =============================================================================
//
// AF_UNIX SOCK_SEQPACKET sockets, non-blocking and close-on-exec, one per
// session. Service sockets are files: <runtime dir>/<name>, where the runtime
// dir is $LEMSG_RUNTIME_DIR or /run/lemsg. No abstract-namespace sockets:
// file modes and owners decide who may connect. Received fds arrive
// close-on-exec; whenever a frame is refused, every fd that came with it is
// closed. Peer credentials come from SO_PEERCRED at connect time.
//
// Socket files and the runtime dir:
//   - The runtime dir must be safe, or both ends refuse it (UnsafeRuntimeDir,
//     with a log line saying which directory and why): it and every directory
//     above it in its path belong to root or to this process's user, and no
//     one else may write it (a directory above it may be writable by others
//     only with the sticky bit, like /tmp; the runtime dir itself not even
//     then). Otherwise another user could put an impostor's socket in place
//     of a server's.
//   - advertise() creates a missing runtime dir with mode 0755 (whatever the
//     umask), so others may reach the sockets their file modes let them use.
//   - Advertisers of one runtime dir take turns (flock on the directory): of
//     several processes advertising one name at once exactly one wins, the
//     others get Duplicate. Only a stale socket file (no one listens) is
//     replaced; any other file with the name is left alone (Duplicate).
//   - Only the process that advertised removes the socket file, and only
//     while the file is still the one it created (device and inode): a
//     forked child's copy of a Service, or a server whose file was replaced,
//     removes nothing.

/// Who is at the other end of a session, as the kernel saw it at connect
/// time. Authorise by uid and gid; the pid is for information only (pids are
/// reused).
struct Credentials {
  pid_t pid = 0;
  uid_t uid = static_cast<uid_t>(-1);
  gid_t gid = static_cast<gid_t>(-1);
};

/// The runtime directory services listen in: $LEMSG_RUNTIME_DIR if set and
/// not empty, else /run/lemsg. Read at each call (no allocation).
inline const char* runtime_dir() noexcept;

/// How a Service or Session finds the other end (section 13). Direct: the
/// socket file <runtime dir>/<name>. Directory: through the service
/// directory daemon (lemsg-dir), by binding. Auto, the default, reads the
/// environment at each advertise/open, so one binary works both ways:
/// LEMSG_DIRECTORY unset, empty or "0" is Direct; "1" is Directory with the
/// daemon at <runtime dir>/directory; an absolute path is Directory with the
/// daemon's socket at that path.
enum class Discovery : std::uint8_t { Auto, Direct, Directory };

namespace detail {

/// A socket path: runtime dir + "/" + name. Names are 1..LEMSG_MAX_NAME
/// characters of [A-Za-z0-9._-], not starting with '.'. BadParameter for a
/// bad name or a path longer than sun_path.
inline Result socket_path(const char* name, char (&out)[sizeof(sockaddr_un::sun_path)]) noexcept;

/// Identity of a socket file (device and inode), so that a service removes
/// only the file it created.
struct SocketFile {
  std::uint64_t dev = 0;
  std::uint64_t ino = 0;
};

/// Creates, binds (under a temporary name, then linked into place so no
/// client ever sees the file before its mode and group are set) and listens,
/// holding the directory's lock (flock) so advertisers take turns. A socket
/// file that no process listens on is replaced; one that answers, or whose
/// backlog is full, is a Duplicate; one we may not connect to is left alone
/// (NotPermitted); a file that is not a socket is never replaced (Duplicate,
/// logged). `group` (gid_t(-1): none) is given to the file with chown; the
/// new file's identity goes to `file` when not null. Ok with `fd` set,
/// Duplicate, NotPermitted (the file's mode or the group refuses us),
/// NoRuntimeDir (we may not create files in the directory), BadParameter
/// (the path plus a temporary suffix does not fit), SystemError (logged; a
/// missing directory is one).
inline Result listen_at(const char* path, mode_t mode, int& fd, gid_t group = static_cast<gid_t>(-1),
                        SocketFile* file = nullptr) noexcept;

/// Removes the socket file `path` only while it is still `file`, holding the
/// directory's lock. True when removed.
inline bool remove_socket_file(const char* path, const SocketFile& file) noexcept;

/// Checks the directory that holds socket `path` and those above it (see
/// "Socket files and the runtime dir"). Ok; NotFound when the directory does
/// not exist; UnsafeRuntimeDir (logged); SystemError (logged).
inline Result check_socket_dir(const char* path) noexcept;

/// Adds to inotify instance `ino` a watch for files appearing in the
/// directory of socket `path`, or, while that directory does not exist, a
/// watch on its parent for the directory's creation (`parent_wd`, removed
/// once the directory itself is watched). Call again after every event: a
/// deleted directory loses its watch, a new one needs one. False when
/// neither can be watched.
inline bool watch_socket_dir(int ino, const char* path, int& parent_wd) noexcept;

/// open_sync's blocking wait for a socket file to appear: inotify on its
/// directory (watch_socket_dir), made only once the server is found missing
/// (closing an inotify instance costs milliseconds); without inotify it
/// re-checks every 20 ms. Closes its inotify fd when it goes.
class SocketWaiter {
 public:
  SocketWaiter() noexcept = default;
  SocketWaiter(const SocketWaiter&) = delete;
  SocketWaiter& operator=(const SocketWaiter&) = delete;
  ~SocketWaiter() {
    if (ino_ >= 0) ::close(ino_);
  }
  /// Starts watching for `path`; true when inotify watches it.
  bool start(const char* path) noexcept;
  /// Waits at most `ms` for the directory to change (at most 20 ms when
  /// nothing is watched or `soon`), then moves the watch if the directory
  /// was deleted or made, so nothing is missed before the next connect.
  void wait(const char* path, int ms, bool soon) noexcept;

 private:
  int ino_ = -1;
  int parent_wd_ = -1;
  bool armed_ = false;
};

/// Connects a non-blocking socket to `path`. Ok with `fd` set; NotFound when
/// nothing listens (no file, or a stale one); NotPermitted when the file's
/// mode refuses us; Busy when the server's backlog is full; SystemError.
inline Result connect_to(const char* path, int& fd) noexcept;

/// Credentials of the peer of a connected socket.
inline Result peer_credentials(int fd, Credentials& out) noexcept;

/// True when `fd` refers to a directory.
inline bool is_directory(int fd) noexcept;

/// True when `fd` is a Unix (AF_UNIX) socket.
inline bool is_unix_socket(int fd) noexcept;

/// True when `fd` is a Unix socket whose peer (SO_PEERCRED) is this process:
/// received from a peer, it may be the peer's end of the very connection it
/// came on, which would keep that connection alive after the peer dies.
inline bool connected_to_us(int fd) noexcept;

/// Puts a connected socket in blocking mode (true on success). Callers then
/// pass MSG_DONTWAIT wherever they must not wait.
inline bool clear_nonblock(int fd) noexcept;

/// Whether this system lets one datagram carry `len` bytes. The kernel
/// refuses (EMSGSIZE) a datagram longer than the sending socket's buffer
/// (net.core.wmem_default, about 208 KiB) less a little overhead; a socket
/// may raise its own buffer up to twice net.core.wmem_max. Ok with `sndbuf`
/// 0 when the default buffer is enough, or the SO_SNDBUF value each socket
/// must get (set_send_buffer); TooBigForSocket when even the largest buffer
/// allowed is too small; SystemError. Probes with a socketpair, so call it
/// at construction, not per message.
inline Result probe_datagram(std::size_t len, int& sndbuf) noexcept;

/// Gives a connected socket the send buffer probe_datagram() asked for
/// (nothing when `sndbuf` is 0). A failure shows later as TooBigForSocket.
inline void set_send_buffer(int fd, int sndbuf) noexcept;

/// Sends one datagram, with `pass_fd` (>= 0) attached. Ok, WouldBlock,
/// Closed (peer gone), SystemError. Never raises SIGPIPE.
inline Result send_datagram(int fd, const void* buf, std::size_t len, int pass_fd) noexcept;
/// sendmsg() of one datagram with `pass_fd` in SCM_RIGHTS (EINTR retried): its result, errno set.
inline ssize_t send_with_fd(int fd, const void* buf, std::size_t len, int pass_fd) noexcept;

/// Receives one datagram into `buf` (capacity `cap`). Ok with `len` and
/// `fd_out` (-1 when none) set; WouldBlock; Closed (orderly end or reset,
/// once the datagrams the peer sent before it are read); TooLarge (datagram
/// longer than `cap`); BadFrame (an empty datagram, control data truncated,
/// more than one fd, a directory fd, or a Unix socket connected to this
/// process, see connected_to_us). On every result but Ok, each fd that
/// arrived has been closed already. With `wait` on a blocking socket it waits
/// for a datagram up to the socket's SO_RCVTIMEO (then WouldBlock).
/// `own_sockets` lets through a Unix socket connected to this process (the
/// service directory hands a server such a socket when client and server
/// are one process).
inline Result recv_datagram(int fd, void* buf, std::size_t cap, std::size_t& len, int& fd_out,
                            bool wait = false, bool own_sockets = false) noexcept;

/// Datagrams one recv_datagrams() call reads at most.
constexpr std::size_t max_batch = 8;

/// One buffer of a batch receive and what arrived in it: `result` is Ok with
/// `len` and `fd` set, or says why the datagram is refused (its fds closed).
struct Datagram {
  void* buf;
  std::size_t cap;
  std::size_t len;
  int fd;
  Result result;
};

/// Receives up to `count` (<= max_batch) datagrams with one recvmmsg(). Ok
/// with `got` (>= 1) entries filled, each checked like recv_datagram(); fewer
/// than `count` means the socket held no more. WouldBlock when none waits;
/// Closed or SystemError as recv_datagram (which it falls back to on errors,
/// so frames a reset peer sent first are still read).
inline Result recv_datagrams(int fd, Datagram* d, std::size_t count, std::size_t& got) noexcept;

}  // namespace detail

// -- implementation --

inline const char* runtime_dir() noexcept {
  const char* d = std::getenv("LEMSG_RUNTIME_DIR");
  return (d && *d) ? d : "/run/lemsg";
}

namespace detail {

// A service or interface name: 1..LEMSG_MAX_NAME characters of
// [A-Za-z0-9._-], not starting with '.'.
inline bool valid_name(const char* name) noexcept {
  if (name == nullptr || name[0] == '\0' || name[0] == '.') return false;
  for (std::size_t n = 0; name[n]; ++n) {
    const char c = name[n];
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                    c == '_' || c == '-';
    if (!ok || n >= LEMSG_MAX_NAME) return false;
  }
  return true;
}

// Whether `d` means directory mode (Auto: $LEMSG_DIRECTORY), and then the
// directory's socket path in `path`. A LEMSG_DIRECTORY that is neither "0",
// "1" nor an absolute path that fits is logged and taken as "1".
inline bool directory_mode(Discovery d, char (&path)[sizeof(sockaddr_un::sun_path)]) noexcept {
  path[0] = '\0';
  if (d == Discovery::Direct) return false;
  const char* e = std::getenv("LEMSG_DIRECTORY");
  const bool env_set = e && *e && std::strcmp(e, "0") != 0;
  if (d == Discovery::Auto && !env_set) return false;
  if (env_set && e[0] == '/' && std::strlen(e) < sizeof path) {
    std::memcpy(path, e, std::strlen(e) + 1);
    return true;
  }
  if (env_set && std::strcmp(e, "1") != 0)
    LEMSG_LOG(Warning, "LEMSG_DIRECTORY=%s is not 0, 1 or an absolute socket path; using the default", e);
  const int w = std::snprintf(path, sizeof path, "%s/directory", runtime_dir());
  if (w < 0 || static_cast<std::size_t>(w) >= sizeof path) path[0] = '\0';
  return true;
}

inline Result socket_path(const char* name, char (&out)[sizeof(sockaddr_un::sun_path)]) noexcept {
  if (!valid_name(name)) return Result::BadParameter;
  const int w = std::snprintf(out, sizeof out, "%s/%s", runtime_dir(), name);
  if (w < 0 || static_cast<std::size_t>(w) >= sizeof out) return Result::BadParameter;
  return Result::Ok;
}

inline bool fill_address(const char* path, sockaddr_un& sa, socklen_t& len) noexcept {
  std::memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  const std::size_t n = std::strlen(path);
  if (n == 0 || n >= sizeof sa.sun_path) return false;
  std::memcpy(sa.sun_path, path, n + 1);
  len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + n + 1);
  return true;
}

inline Result connect_to(const char* path, int& fd) noexcept {
  fd = -1;
  sockaddr_un sa;
  socklen_t len;
  if (!fill_address(path, sa, len)) return Result::BadParameter;
  const int s = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (s < 0) {
    LEMSG_LOG(Error, "transport: socket failed: %s", std::strerror(errno));
    return Result::SystemError;
  }
  int rc;
  do {
    rc = ::connect(s, reinterpret_cast<const sockaddr*>(&sa), len);
  } while (rc < 0 && errno == EINTR);
  if (rc == 0) {
    fd = s;
    return Result::Ok;
  }
  const int e = errno;
  ::close(s);
  switch (e) {
    case ENOENT:
    case ECONNREFUSED:
    case ENOTDIR:
      return Result::NotFound;
    case EACCES:
    case EPERM:
      return Result::NotPermitted;
    case EAGAIN:
      return Result::Busy;
    default:
      LEMSG_LOG(Error, "transport: connect to %s failed: %s", path, std::strerror(e));
      return Result::SystemError;
  }
}

// The directory part of `path` ("." when it has none, "/" for a top-level name).
inline void directory_of(const char* path, char (&dir)[sizeof(sockaddr_un::sun_path)]) noexcept {
  std::snprintf(dir, sizeof dir, "%s", path);
  char* slash = std::strrchr(dir, '/');
  if (slash == nullptr) std::snprintf(dir, sizeof dir, ".");
  else if (slash == dir) dir[1] = '\0';
  else *slash = '\0';
}

// Holds an exclusive flock() on a directory while it lives, so that the
// advertisers of one runtime dir check and replace socket files one at a time.
struct DirLock {
  int fd = -1;
  DirLock() noexcept = default;
  DirLock(const DirLock&) = delete;
  DirLock& operator=(const DirLock&) = delete;
  ~DirLock() {
    if (fd >= 0) ::close(fd);  // releases the lock
  }
  // Locks the directory of `path`. 0, or the errno that stopped it.
  int lock(const char* path) noexcept {
    char dir[sizeof(sockaddr_un::sun_path)];
    directory_of(path, dir);
    fd = ::open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return errno;
    int rc;
    do {
      rc = ::flock(fd, LOCK_EX);
    } while (rc < 0 && errno == EINTR);
    return rc < 0 ? errno : 0;
  }
};

inline Result listen_at(const char* path, mode_t mode, int& fd, gid_t group, SocketFile* file) noexcept {
  fd = -1;
  char tmp[sizeof(sockaddr_un::sun_path)];
  const int w = std::snprintf(tmp, sizeof tmp, "%s.%ld.tmp", path, static_cast<long>(::getpid()));
  if (w < 0 || static_cast<std::size_t>(w) >= sizeof tmp) return Result::BadParameter;
  sockaddr_un sa;
  socklen_t len;
  if (!fill_address(tmp, sa, len)) return Result::BadParameter;
  DirLock lock;
  if (const int e = lock.lock(path)) {
    LEMSG_LOG(Error, "transport: cannot lock the directory of %s: %s", path, std::strerror(e));
    return e == EACCES ? Result::NoRuntimeDir : Result::SystemError;
  }
  // Under the lock no other advertiser can create or replace the file
  // between this check and the link below.
  bool stale = false;
  struct stat st;
  if (::lstat(path, &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      LEMSG_LOG(Error, "transport: %s exists and is not a socket: not replaced (remove it)", path);
      return Result::Duplicate;
    }
    int probe = -1;
    const Result live = connect_to(path, probe);
    if (live == Result::Ok) {
      ::close(probe);
      return Result::Duplicate;
    }
    // Only a refusing (stale) socket may be replaced: a full backlog is a
    // live server, and a file we may not connect to cannot be probed.
    if (live == Result::Busy) return Result::Duplicate;
    if (live != Result::NotFound) return live;
    stale = true;
  } else if (errno != ENOENT) {
    LEMSG_LOG(Error, "transport: cannot look at %s: %s", path, std::strerror(errno));
    return errno == EACCES ? Result::NoRuntimeDir : Result::SystemError;
  }
  const int s = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (s < 0) return Result::SystemError;
  ::unlink(tmp);  // left by a dead process that had our pid
  Result r = Result::Ok;
  struct stat made = {};
  if (::bind(s, reinterpret_cast<const sockaddr*>(&sa), len) < 0) {
    const int e = errno;
    r = (e == EACCES || e == EPERM || e == EROFS) ? Result::NoRuntimeDir : Result::SystemError;
    LEMSG_LOG(Error, "transport: cannot create %s: %s", tmp, std::strerror(e));
  } else {
    // link() fails when the name exists: a file made meanwhile by a process
    // that does not take the lock is never overwritten.
    const char* step = nullptr;
    if (group != static_cast<gid_t>(-1) && ::chown(tmp, static_cast<uid_t>(-1), group) != 0)
      step = "giving its group to";
    else if (::chmod(tmp, mode) != 0 || ::lstat(tmp, &made) != 0)
      step = "setting the mode of";
    else if (::listen(s, 64) != 0)
      step = "listening on";
    else if (stale && ::unlink(path) != 0 && errno != ENOENT)
      step = "replacing the stale";
    else if (::link(tmp, path) != 0)
      step = "publishing";
    if (step) {
      const int e = errno;
      r = e == EEXIST ? Result::Duplicate : (e == EACCES || e == EPERM) ? Result::NotPermitted : Result::SystemError;
      LEMSG_LOG(Error, "transport: %s %s failed: %s", step, path, std::strerror(e));
    }
    ::unlink(tmp);
  }
  if (r != Result::Ok) {
    ::close(s);
    return r;
  }
  if (file) {
    file->dev = static_cast<std::uint64_t>(made.st_dev);
    file->ino = static_cast<std::uint64_t>(made.st_ino);
  }
  fd = s;
  return Result::Ok;
}

inline bool remove_socket_file(const char* path, const SocketFile& file) noexcept {
  DirLock lock;
  if (lock.lock(path) != 0) return false;  // no directory: no file either
  struct stat st;
  if (::lstat(path, &st) != 0 || static_cast<std::uint64_t>(st.st_dev) != file.dev ||
      static_cast<std::uint64_t>(st.st_ino) != file.ino)
    return false;
  return ::unlink(path) == 0;
}

inline Result check_socket_dir(const char* path) noexcept {
  char dir[sizeof(sockaddr_un::sun_path)];
  directory_of(path, dir);
  const uid_t me = ::geteuid();
  // The runtime dir first, then each directory above it in the path. A
  // relative path is checked up to its first component.
  for (bool first = true;; first = false) {
    struct stat st;
    if (::stat(dir, &st) != 0) {
      if (first && (errno == ENOENT || errno == ENOTDIR)) return Result::NotFound;
      LEMSG_LOG(Error, "transport: cannot check the runtime dir %s: %s", dir, std::strerror(errno));
      return Result::SystemError;
    }
    const char* why = nullptr;
    if (!S_ISDIR(st.st_mode)) why = "is not a directory";
    else if (st.st_uid != 0 && st.st_uid != me) why = "belongs to another user";
    else if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0 && (first || (st.st_mode & S_ISVTX) == 0))
      why = first ? "may be written by its group or others" : "may be written by its group or others and is not sticky";
    if (why) {
      LEMSG_LOG(Error, "transport: refusing the runtime dir of %s: %s (uid %u, mode %04o) %s", path, dir,
                static_cast<unsigned>(st.st_uid), static_cast<unsigned>(st.st_mode & 07777), why);
      return Result::UnsafeRuntimeDir;
    }
    char* slash = std::strrchr(dir, '/');
    if (slash == nullptr || (slash == dir && dir[1] == '\0')) return Result::Ok;
    if (slash == dir) dir[1] = '\0';
    else *slash = '\0';
  }
}

inline bool watch_socket_dir(int ino, const char* path, int& parent_wd) noexcept {
  char dir[sizeof(sockaddr_un::sun_path)];
  directory_of(path, dir);
  if (::inotify_add_watch(ino, dir, IN_CREATE | IN_MOVED_TO | IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF) >= 0) {
    if (parent_wd >= 0) ::inotify_rm_watch(ino, parent_wd);
    parent_wd = -1;
    return true;
  }
  if (errno != ENOENT) return false;
  // The directory is missing: wait for it to be made in its parent.
  char parent[sizeof dir];
  directory_of(dir, parent);
  const int wd = ::inotify_add_watch(ino, parent, IN_CREATE | IN_MOVED_TO);
  if (wd < 0) return false;
  parent_wd = wd;
  return true;
}

inline bool SocketWaiter::start(const char* path) noexcept {
  ino_ = ::inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  armed_ = ino_ >= 0 && watch_socket_dir(ino_, path, parent_wd_);
  return armed_;
}

inline void SocketWaiter::wait(const char* path, int ms, bool soon) noexcept {
  struct pollfd pfd = {ino_, POLLIN, 0};
  const int rc = ::poll(&pfd, ino_ >= 0 ? 1 : 0, (!armed_ || soon) && ms > 20 ? 20 : ms);
  if (rc > 0) {
    alignas(struct inotify_event) char buf[1024];
    while (::read(ino_, buf, sizeof buf) > 0) {
    }
  }
  if (ino_ >= 0) armed_ = watch_socket_dir(ino_, path, parent_wd_);
}

inline Result peer_credentials(int fd, Credentials& out) noexcept {
  struct ucred uc;
  socklen_t len = sizeof uc;
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &uc, &len) < 0 || len != sizeof uc) return Result::SystemError;
  out.pid = uc.pid;
  out.uid = uc.uid;
  out.gid = uc.gid;
  return Result::Ok;
}

inline Result check_datagram(int fd, struct msghdr& mh, ssize_t n, std::size_t& len, int& fd_out,
                             bool own_sockets = false) noexcept;

inline bool clear_nonblock(int fd) noexcept {
  // One call, no F_GETFL first: the sockets lemsg makes carry no other
  // status flag F_SETFL could change (O_APPEND, O_ASYNC, O_DIRECT, O_NOATIME).
  return ::fcntl(fd, F_SETFL, 0) == 0;
}

inline bool is_directory(int fd) noexcept {
  struct stat st;
  return ::fstat(fd, &st) == 0 && S_ISDIR(st.st_mode);
}

// Bytes the kernel keeps for itself out of a send buffer (32 in Linux's
// unix_dgram_sendmsg), with room to spare.
constexpr std::size_t send_buffer_slack = 256;

inline Result probe_datagram(std::size_t len, int& sndbuf) noexcept {
  sndbuf = 0;
  // No system lowers the buffer this far: small frames need no probe.
  if (len <= 4096) return Result::Ok;
  if (len > static_cast<std::size_t>(INT32_MAX / 2) - send_buffer_slack) return Result::TooBigForSocket;
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
    LEMSG_LOG(Error, "transport: socketpair failed: %s", std::strerror(errno));
    return Result::SystemError;
  }
  int have = 0;
  socklen_t sl = sizeof have;
  Result r = Result::Ok;
  if (::getsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &have, &sl) < 0) {
    r = Result::SystemError;
  } else if (static_cast<std::size_t>(have) < len + send_buffer_slack) {
    // The kernel doubles what is asked for, capped at twice wmem_max
    // (SO_SNDBUFFORCE, which ignores the cap, is left to the system's owner).
    const int want = static_cast<int>(len + send_buffer_slack);
    sl = sizeof have;
    if (::setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &want, sizeof want) < 0 ||
        ::getsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &have, &sl) < 0)
      r = Result::SystemError;
    else if (static_cast<std::size_t>(have) < len + send_buffer_slack)
      r = Result::TooBigForSocket;
    else
      sndbuf = want;
  }
  if (r == Result::SystemError) LEMSG_LOG(Error, "transport: SO_SNDBUF failed: %s", std::strerror(errno));
  ::close(sv[0]);
  ::close(sv[1]);
  return r;
}

inline void set_send_buffer(int fd, int sndbuf) noexcept {
  if (sndbuf > 0 && ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf) < 0)
    LEMSG_LOG(Warning, "transport: SO_SNDBUF %d failed: %s", sndbuf, std::strerror(errno));
}

inline bool is_unix_socket(int fd) noexcept {
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode)) return false;
  // getsockname rather than SO_DOMAIN: older kernels and qemu-user know it.
  struct sockaddr_storage sa;
  socklen_t len = sizeof sa;
  std::memset(&sa, 0, sizeof sa);
  return ::getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len) == 0 && sa.ss_family == AF_UNIX;
}

inline bool connected_to_us(int fd) noexcept {
  if (!is_unix_socket(fd)) return false;
  Credentials c;
  return peer_credentials(fd, c) == Result::Ok && c.pid == ::getpid();
}

inline Result send_datagram(int fd, const void* buf, std::size_t len, int pass_fd) noexcept {
  ssize_t n;
  if (pass_fd < 0) {
    // No fd travels: a plain send(), without a message header to build and copy in.
    do {
      n = ::send(fd, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
  } else {
    n = send_with_fd(fd, buf, len, pass_fd);
  }
  if (n >= 0) return Result::Ok;  // SEQPACKET sends whole datagrams or nothing
  if (errno == EAGAIN || errno == EWOULDBLOCK) return Result::WouldBlock;
  if (errno == EPIPE || errno == ECONNRESET || errno == ENOTCONN) return Result::Closed;
  if (errno == EMSGSIZE) return Result::TooBigForSocket;
  LEMSG_LOG(Error, "transport: send failed: %s", std::strerror(errno));
  return Result::SystemError;
}

inline ssize_t send_with_fd(int fd, const void* buf, std::size_t len, int pass_fd) noexcept {
  struct iovec iov;
  iov.iov_base = const_cast<void*>(buf);
  iov.iov_len = len;
  struct msghdr mh;
  std::memset(&mh, 0, sizeof mh);
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  alignas(struct cmsghdr) unsigned char control[CMSG_SPACE(sizeof(int))];
  {
    std::memset(control, 0, sizeof control);
    mh.msg_control = control;
    mh.msg_controllen = sizeof control;
    struct cmsghdr* c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &pass_fd, sizeof(int));
  }
  ssize_t n;
  do {
    n = ::sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
  } while (n < 0 && errno == EINTR);
  return n;
}

inline Result recv_datagram(int fd, void* buf, std::size_t cap, std::size_t& len, int& fd_out, bool wait,
                            bool own_sockets) noexcept {
  len = 0;
  fd_out = -1;
  struct iovec iov;
  iov.iov_base = buf;
  iov.iov_len = cap;
  struct msghdr mh;
  std::memset(&mh, 0, sizeof mh);
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  // Room for more fds than a frame may carry, so a peer that sends several
  // is seen (and each of them closed) instead of silently truncated.
  alignas(struct cmsghdr) unsigned char control[CMSG_SPACE(4 * sizeof(int))];
  mh.msg_control = control;
  mh.msg_controllen = sizeof control;
  ssize_t n;
  bool reset = false;
  for (;;) {
    mh.msg_controllen = sizeof control;
    n = ::recvmsg(fd, &mh, (wait ? 0 : MSG_DONTWAIT) | MSG_CMSG_CLOEXEC);
    if (n >= 0) break;
    if (errno == EINTR) {
      // A waiting caller has a deadline: let it set what is left of it.
      if (wait && !reset) return Result::WouldBlock;
      continue;
    }
    // A peer that closed with frames of ours unread leaves ECONNRESET, which
    // the kernel reports once and before the datagrams the peer sent first
    // (a Refuse, a last response): read again, so those are not lost.
    if (errno != ECONNRESET || reset) break;
    reset = true;
  }
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return reset ? Result::Closed : Result::WouldBlock;
    if (errno == ECONNRESET || errno == ENOTCONN || errno == EPIPE) return Result::Closed;
    LEMSG_LOG(Error, "transport: recvmsg failed: %s", std::strerror(errno));
    return Result::SystemError;
  }
  return check_datagram(fd, mh, n, len, fd_out, own_sockets);
}

inline Result check_datagram(int fd, struct msghdr& mh, ssize_t n, std::size_t& len, int& fd_out,
                             bool own_sockets) noexcept {
  len = 0;
  fd_out = -1;
  int fds[4];
  std::size_t nfds = 0;
  bool bad_control = (mh.msg_flags & MSG_CTRUNC) != 0;
  // musl's CMSG_NXTHDR compares a size_t with a pointer difference, which
  // clang's -Wsign-compare reports where the macro is used.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsign-compare"
  for (struct cmsghdr* c = CMSG_FIRSTHDR(&mh); c != nullptr; c = CMSG_NXTHDR(&mh, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) {
      bad_control = true;
      continue;
    }
    const std::size_t bytes = c->cmsg_len > CMSG_LEN(0) ? c->cmsg_len - CMSG_LEN(0) : 0;
    for (std::size_t i = 0; i < bytes / sizeof(int) && nfds < 4; ++i)
      std::memcpy(&fds[nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
  }
#pragma GCC diagnostic pop
  Result r = Result::Ok;
  if (n == 0 && nfds == 0) {
    // SOCK_SEQPACKET reads 0 both at the end and for an empty datagram. Only
    // the end leaves the socket hung up; an empty datagram is a bad frame.
    // (POLLIN is not asked for, so any event here is a hang-up or an error.)
#ifdef POLLRDHUP
    struct pollfd p = {fd, POLLRDHUP, 0};
#else
    struct pollfd p = {fd, 0, 0};
#endif
    r = ::poll(&p, 1, 0) != 0 ? Result::Closed : Result::BadFrame;
  } else if (mh.msg_flags & MSG_TRUNC) {
    r = Result::TooLarge;
  }
  if (r == Result::Ok && (bad_control || nfds > 1)) r = Result::BadFrame;
  if (r == Result::Ok && nfds == 1 && is_directory(fds[0])) r = Result::BadFrame;  // a directory fd escapes a sandbox
  // A socket connected to us (the peer's own end of this connection, say)
  // keeps the connection alive after the peer dies: its hang-up never comes.
  if (r == Result::Ok && nfds == 1 && !own_sockets && connected_to_us(fds[0])) {
    LEMSG_LOG(Debug, "transport: refusing a Unix socket fd connected to this process");
    r = Result::BadFrame;
  }
  if (r != Result::Ok) {
    for (std::size_t i = 0; i < nfds; ++i) ::close(fds[i]);
    return r;
  }
  len = static_cast<std::size_t>(n);
  fd_out = nfds == 1 ? fds[0] : -1;
  return Result::Ok;
}

inline Result recv_datagrams(int fd, Datagram* d, std::size_t count, std::size_t& got) noexcept {
  got = 0;
  if (count == 0) return Result::BadParameter;
  if (count > max_batch) count = max_batch;
  struct mmsghdr mm[max_batch];
  struct iovec iov[max_batch];
  alignas(struct cmsghdr) unsigned char control[max_batch][CMSG_SPACE(4 * sizeof(int))];
  std::memset(mm, 0, sizeof mm);
  for (std::size_t i = 0; i < count; ++i) {
    iov[i].iov_base = d[i].buf;
    iov[i].iov_len = d[i].cap;
    mm[i].msg_hdr.msg_iov = &iov[i];
    mm[i].msg_hdr.msg_iovlen = 1;
    mm[i].msg_hdr.msg_control = control[i];
    mm[i].msg_hdr.msg_controllen = sizeof control[i];
  }
  int n;
  do {
    n = ::recvmmsg(fd, mm, static_cast<unsigned>(count), MSG_DONTWAIT | MSG_CMSG_CLOEXEC, nullptr);
  } while (n < 0 && errno == EINTR);
  if (n == 0 || (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))) return Result::WouldBlock;
  if (n < 0) {
    // A reset, or any other error: the single receive knows how to read on.
    d[0].result = recv_datagram(fd, d[0].buf, d[0].cap, d[0].len, d[0].fd);
    if (d[0].result != Result::Ok) return d[0].result;
    got = 1;
    return Result::Ok;
  }
  for (int i = 0; i < n; ++i)
    d[i].result = check_datagram(fd, mm[i].msg_hdr, static_cast<ssize_t>(mm[i].msg_len), d[i].len, d[i].fd);
  got = static_cast<std::size_t>(n);
  return Result::Ok;
}

}  // namespace detail

// =============================================================================
// 8. Messages                                                        >>message
// =============================================================================
//
// The Legato model on Unix sockets, with no daemon ("direct mode"), in four
// sections: messages (this one), the channel under both ends, the Service
// and the Session:
//
//   Protocol   id string + largest payload; client and server must agree on
//              both, or the open is refused (ProtocolMismatch, SizeMismatch).
//   Message    a reference-counted handle to a block of a MessagePool; it
//              carries up to the protocol's maximum payload and at most one
//              fd, and only its used bytes travel.
//   Service    the server end: advertise(name) makes <runtime dir>/<name>;
//              open, close and receive handlers; per-session context and
//              credentials; send to one session; respond to requests.
//   Session    the client end: open (async; waits for a server that is not
//              there yet), open_sync (with a timeout), try_open (once);
//              send, request (async) and request_sync (with a timeout).
//
// Promises (each has a test):
//   - Every request completes exactly once: with its response, or with
//     Closed when the session closes for any reason, or Timeout when its
//     timeout passes, or Unanswered when the server released it unanswered.
//   - A client that dies leaves the server as if it had closed: the close
//     handler runs once and RefMap entries the session owned are released.
//   - A server that dies completes every pending request with Closed at once;
//     the client's close handler runs once; with set_reconnect() the client
//     opens again when the server returns. Nothing kills the client.
//   - A peer that sends a malformed frame has its session closed (reason
//     BadFrame or TooLarge); nothing else is touched and nothing leaks.
//   - At most LEMSG_MAX_OUTGOING frames wait per session when the peer does
//     not read: send() then returns Overflow (the message stays the caller's);
//     a response that cannot be queued closes the session with Overflow,
//     because a response is never dropped silently.
//   - A client that reads nothing for LEMSG_STALL_TIMEOUT_MS while frames
//     wait for it is closed with Stalled, with the fds and blocks the queue
//     held, even when its socket lives on elsewhere (no hang-up comes).
//   - A synchronous call that only this thread's own loop could answer
//     returns WouldDeadlock at once.

/// What both ends of a session agree on. `id` must outlive the objects that
/// use it; 1..LEMSG_MAX_PROTOCOL_ID bytes.
struct Protocol {
  const char* id;
  std::uint32_t max_payload;
};

/// A server's handle for one client session. Generation-checked: a handle
/// to a closed session never reaches another session.
using SessionRef = Handle<struct SessionTag>;

class MessagePoolBase;
class Service;
class Session;

namespace detail {

enum class MsgKind : std::uint8_t { Outgoing, Received, Request, Response };

// A message block: this header, then the wire header, then the payload, so
// a frame is sent straight from the block with one system call.
struct MsgBlock {
  MessagePoolBase* pool;
  // The Service a request arrived at, and how it answers one released
  // unanswered: this section needs nothing of the Service's.
  void* service;
  void (*unanswered)(void* service, std::uint32_t session, std::uint32_t txn) noexcept;
  // The next block of the channel queue this one waits in (BlockQueue): a
  // session's queues cost two pointers, not a slot per frame they may hold.
  MsgBlock* next;
  std::uint32_t session;
  std::uint32_t txn;
  std::uint32_t size;
  std::int32_t status;  // Result carried by an error response
  int fd;
  MsgKind kind;
  bool responded;
  std::uint8_t frame_type;   // as received (wire::FrameType)
  std::uint8_t frame_flags;  // as received
  alignas(8) unsigned char header[wire::header_size];
};
static_assert(offsetof(MsgBlock, header) + wire::header_size == sizeof(MsgBlock),
              "payload must follow the wire header directly");

inline unsigned char* payload_of(MsgBlock* b) noexcept { return reinterpret_cast<unsigned char*>(b) + sizeof(MsgBlock); }

struct Channel;
struct TypedAccess;
struct BlockQueue;

}  // namespace detail

/// A reference-counted handle to a pooled message. Copying adds a
/// reference; the block (and any fd it still holds) is freed when the last
/// handle goes. An empty Message is false. Belongs to the thread of the loop
/// that created or received it.
class Message {
 public:
  Message() noexcept = default;
  Message(const Message& o) noexcept;
  Message(Message&& o) noexcept : blk_(o.blk_) { o.blk_ = nullptr; }
  Message& operator=(const Message& o) noexcept;
  Message& operator=(Message&& o) noexcept;
  ~Message() { release(); }

  explicit operator bool() const noexcept { return blk_ != nullptr; }

  /// Drops this handle's reference. A request received by a Service and
  /// released unanswered is answered with Unanswered by the library.
  void release() noexcept;

  /// The payload: capacity() bytes may be written, size() are in use.
  void* payload() noexcept { return blk_ ? detail::payload_of(blk_) : nullptr; }
  const void* payload() const noexcept { return blk_ ? detail::payload_of(blk_) : nullptr; }
  std::uint32_t size() const noexcept { return blk_ ? blk_->size : 0; }
  /// Largest payload this message can carry (the pool's maximum).
  std::uint32_t capacity() const noexcept;
  /// Sets how many payload bytes are used (and sent). Ok or BadParameter.
  Result set_size(std::uint32_t n) noexcept;
  /// Copies `n` bytes into the payload and sets the size. Ok or BadParameter.
  Result assign(const void* data, std::uint32_t n) noexcept;

  /// Attaches `fd` (taken over: the message closes it when released, also
  /// after sending). Replaces and closes an fd attached before. Ok, or
  /// BadParameter for a negative fd or a directory (the fd stays the caller's).
  Result set_fd(int fd) noexcept;
  /// Takes the attached fd (the caller must close it); -1 when none.
  int take_fd() noexcept;
  bool has_fd() const noexcept { return blk_ && blk_->fd >= 0; }

  /// True for a request received by a Service that has not been answered.
  bool needs_response() const noexcept {
    return blk_ && blk_->kind == detail::MsgKind::Request && !blk_->responded;
  }
  /// The server-side session this message came from (empty on a client).
  SessionRef session() const noexcept { return SessionRef{blk_ ? blk_->session : 0}; }
  /// Result an error response carries (Ok for a normal message).
  Result status() const noexcept { return blk_ ? static_cast<Result>(blk_->status) : Result::Ok; }

 private:
  friend class MessagePoolBase;
  friend class Service;
  friend class Session;
  friend struct detail::Channel;
  friend struct detail::TypedAccess;
  friend struct detail::BlockQueue;
  bool is_shared() const noexcept;
  detail::MsgBlock* blk_ = nullptr;
};

/// Messages of one maximum payload, Count of them, from storage inside the
/// pool object. Use MessagePool<MaxPayload, Count>. Not thread-safe.
///
/// Lifetime: a pool must outlive every Message from it and every Service and
/// Session using it. Destroying it first is a bug its destructor stops at: it
/// logs the mistake and fails LEMSG_ASSERT.
class MessagePoolBase {
 public:
  MessagePoolBase(const MessagePoolBase&) = delete;
  MessagePoolBase& operator=(const MessagePoolBase&) = delete;
  ~MessagePoolBase();

  /// Takes a message with size 0 and room for max_payload() bytes.
  /// Ok or PoolEmpty (raise the pool's Count).
  Result create(Message& out) noexcept;

  std::uint32_t max_payload() const noexcept { return max_payload_; }
  std::size_t capacity() const noexcept { return blocks_.capacity(); }
  std::size_t in_use() const noexcept { return blocks_.in_use(); }
  std::size_t available() const noexcept { return blocks_.available(); }
  std::size_t high_water() const noexcept { return blocks_.high_water(); }

 protected:
  MessagePoolBase(PoolBase& blocks, std::uint32_t max_payload) noexcept
      : blocks_(blocks), max_payload_(max_payload) {}

 private:
  friend class Message;
  friend class Service;
  friend class Session;
  // Requests `svc` received and nobody answered yet forget it, so releasing
  // them later does not call into a Service that is gone.
  void detach(const void* svc) noexcept;
  PoolBase& blocks_;
  std::uint32_t max_payload_;
  std::size_t users_ = 0;  // Services and Sessions using this pool
};

/// A MessagePool with Count messages of up to MaxPayload bytes each.
template <std::uint32_t MaxPayload, std::size_t Count>
class MessagePool : private Pool<sizeof(detail::MsgBlock) + MaxPayload, Count>, public MessagePoolBase {
  static_assert(MaxPayload >= 4 && MaxPayload <= (1u << 24), "MessagePool payload must be 4..16 MiB");

 public:
  MessagePool() noexcept : MessagePoolBase(*static_cast<PoolBase*>(this), MaxPayload) {}
  // The block pool is a private base only so that it is built first.
  using MessagePoolBase::available;
  using MessagePoolBase::capacity;
  using MessagePoolBase::high_water;
  using MessagePoolBase::in_use;
};

namespace detail {

// What Service and Session constructors check of their protocol and pool;
// each refusal is logged, since it only shows as status() (BadParameter).
inline Result check_protocol(const char* who, const Protocol& protocol, const MessagePoolBase& pool) noexcept {
  const std::size_t idlen = protocol.id ? std::strlen(protocol.id) : 0;
  if (idlen == 0 || idlen > LEMSG_MAX_PROTOCOL_ID) {
    LEMSG_LOG(Error, "%s: the protocol id is empty or longer than LEMSG_MAX_PROTOCOL_ID (%d): BadParameter", who,
              LEMSG_MAX_PROTOCOL_ID);
    return Result::BadParameter;
  }
  if (protocol.max_payload > pool.max_payload()) {
    LEMSG_LOG(Error, "%s %s: the protocol's max_payload %lu is above the pool's %lu: BadParameter (use a larger MessagePool)",
              who, protocol.id, static_cast<unsigned long>(protocol.max_payload),
              static_cast<unsigned long>(pool.max_payload()));
    return Result::BadParameter;
  }
  return Result::Ok;
}

}  // namespace detail

// -- implementation --

inline Message::Message(const Message& o) noexcept : blk_(o.blk_) {
  if (blk_) {
    Result r = blk_->pool->blocks_.add_ref(blk_);
    LEMSG_ASSERT(r == Result::Ok);
    (void)r;
  }
}

inline Message& Message::operator=(const Message& o) noexcept {
  if (this != &o) {
    Message copy(o);
    *this = std::move(copy);
  }
  return *this;
}

inline Message& Message::operator=(Message&& o) noexcept {
  if (this != &o) {
    release();
    blk_ = o.blk_;
    o.blk_ = nullptr;
  }
  return *this;
}

inline void Message::release() noexcept {
  detail::MsgBlock* b = blk_;
  if (!b) return;
  blk_ = nullptr;
  PoolBase& blocks = b->pool->blocks_;
  if (blocks.ref_count(b) == 1) {
    // Last reference: what the block still holds goes with it.
    if (b->fd >= 0) {
      ::close(b->fd);
      b->fd = -1;
    }
    if (b->kind == detail::MsgKind::Request && !b->responded && b->service) {
      b->responded = true;
      b->unanswered(b->service, b->session, b->txn);
    }
  }
  Result r = blocks.release(b);
  LEMSG_ASSERT(r == Result::Ok);
  (void)r;
}

inline bool Message::is_shared() const noexcept { return blk_ && blk_->pool->blocks_.ref_count(blk_) > 1; }

inline std::uint32_t Message::capacity() const noexcept { return blk_ ? blk_->pool->max_payload() : 0; }

inline Result Message::set_size(std::uint32_t n) noexcept {
  if (!blk_ || n > capacity()) return Result::BadParameter;
  blk_->size = n;
  return Result::Ok;
}

inline Result Message::assign(const void* data, std::uint32_t n) noexcept {
  if (!blk_ || n > capacity() || (n > 0 && data == nullptr)) return Result::BadParameter;
  if (n) std::memcpy(payload(), data, n);
  blk_->size = n;
  return Result::Ok;
}

inline Result Message::set_fd(int fd) noexcept {
  if (!blk_ || fd < 0 || detail::is_directory(fd)) return Result::BadParameter;
  if (blk_->fd >= 0 && blk_->fd != fd) ::close(blk_->fd);
  blk_->fd = fd;
  return Result::Ok;
}

inline int Message::take_fd() noexcept {
  if (!blk_) return -1;
  const int fd = blk_->fd;
  blk_->fd = -1;
  return fd;
}

inline MessagePoolBase::~MessagePoolBase() {
  if (users_ != 0 || blocks_.in_use() != 0)
    LEMSG_LOG(Error,
              "MessagePool destroyed while %lu Service/Session objects and %lu Messages use it; "
              "destroy them first",
              static_cast<unsigned long>(users_), static_cast<unsigned long>(blocks_.in_use()));
  LEMSG_ASSERT(users_ == 0 && blocks_.in_use() == 0);
}

inline void MessagePoolBase::detach(const void* svc) noexcept {
  for (std::size_t i = 0; i < blocks_.count_; ++i) {
    if (blocks_.refs_[i] == 0) continue;
    detail::MsgBlock* b = reinterpret_cast<detail::MsgBlock*>(blocks_.blocks_ + i * blocks_.block_size_);
    if (b->service == svc) b->service = nullptr;
  }
}

inline Result MessagePoolBase::create(Message& out) noexcept {
  out.release();
  void* p = nullptr;
  Result r = blocks_.alloc(p);
  if (r != Result::Ok) return r;
  detail::MsgBlock* b = ::new (p) detail::MsgBlock;
  b->pool = this;
  b->service = nullptr;
  b->unanswered = nullptr;
  b->session = 0;
  b->txn = 0;
  b->size = 0;
  b->status = 0;
  b->fd = -1;
  b->kind = detail::MsgKind::Outgoing;
  b->responded = false;
  b->next = nullptr;
  b->frame_type = 0;
  b->frame_flags = 0;
  out.blk_ = b;
  return Result::Ok;
}

// =============================================================================
// 9. Channel                                                         >>channel
// =============================================================================
//
// One connected socket, shared by both ends: its bounded outgoing queue (at
// most LEMSG_MAX_OUTGOING frames, then Overflow), batched reads with one
// recvmmsg(), the receive path that turns a datagram into a Message, and the
// control frames of the open handshake.

namespace detail {

// Blocks in arrival order, linked through MsgBlock::next; each keeps the one
// reference the Message pushed had (a shared Message is never queued).
struct BlockQueue {
  MsgBlock* first = nullptr;
  MsgBlock* last = nullptr;
  std::uint32_t count = 0;

  void push(Message& m) noexcept {
    MsgBlock* b = m.blk_;
    m.blk_ = nullptr;
    b->next = nullptr;
    if (last) last->next = b;
    else first = b;
    last = b;
    ++count;
  }
  // Moves the first block out into `m` (which must be empty).
  void pop(Message& m) noexcept {
    MsgBlock* b = first;
    first = b->next;
    if (!first) last = nullptr;
    b->next = nullptr;
    --count;
    m.blk_ = b;
  }
  void clear() noexcept {
    while (first) {
      Message m;
      pop(m);
    }
  }
};

// One connected socket and its outgoing queue; shared by both ends.
struct Channel {
  int fd = -1;
  WatchId watch;
  bool starved = false;  // pool was empty: reading paused until a retry
  // The socket is in blocking mode (every loop-path call passes MSG_DONTWAIT),
  // so request_sync can wait inside recvmsg, as a plain blocking client does.
  bool blocking = false;
  int rcvtimeo_ms = 0;  // SO_RCVTIMEO last set (0 = never)
  // A Unix socket arriving as an fd is a bad frame (ServiceOptions::accept_socket_fds).
  bool refuse_unix_fds = false;
  // While frames wait: when the peer will have read nothing for stall_ms.
  // Set when the queue starts, pushed back whenever it moves; 0 = empty.
  std::int64_t stall_deadline = 0;
  std::uint32_t stall_ms = LEMSG_STALL_TIMEOUT_MS;
  BlockQueue out;  // at most LEMSG_MAX_OUTGOING frames

  void update_events(Loop& loop) noexcept {
    short ev = starved ? 0 : Readable;
    if (out.count) ev = static_cast<short>(ev | Writable);
    Result r = loop.set_events(watch, ev);
    (void)r;
  }
  // Sends or queues the frame; on any failure `m` is left untouched.
  Result send(Loop& loop, Message& m, wire::FrameType type, std::uint32_t txn, std::uint8_t flags) noexcept;
  // Sends what is queued. Ok (maybe some left), or Closed/SystemError.
  Result flush(Loop& loop) noexcept;
  // Receives one frame into a new pool message.
  Result receive(MessagePoolBase& pool, std::uint32_t max_payload, Message& frame, wire::Header& h,
                 bool wait = false) noexcept;
  // Waits at most `ms` (> 0) in the next receive(wait = true).
  bool set_wait(int ms) noexcept;
  // The one check of every received datagram (both receive paths): decodes
  // the `len` bytes in block `b` with the fd that came (-1: none) and makes
  // them its frame. Ok, or why it is refused (`rfd` closed then).
  Result take_frame(MsgBlock* b, std::size_t len, int rfd, std::uint32_t max_payload, wire::Header& h) noexcept;

  // Frames of the last read, handed out in order by next(). One read per
  // wake-up: poll() is level-triggered, so frames still waiting wake the
  // loop again, and nobody pays a read that only sees EAGAIN. A peer that
  // waits for each answer is read with one recvmsg() of one frame. Every
  // probe_every-th such read asks for two instead: when both come, the peer
  // is streaming, and each wake-up reads a recvmmsg() batch sized by the
  // last one (twice what it brought, 2 to max_batch; a full batch of
  // max_batch reads on at once). After `stream_misses` batches in a row
  // that brought one frame or none, reads are single again.
  BlockQueue held;
  Result held_err = Result::Ok;  // what ends the batch after its good frames
  bool drained = false;
  std::uint8_t want = 1;         // frames the next read asks for (1: not streaming)
  std::uint8_t lone_reads = 0;   // one-frame reads since the last probe
  std::uint8_t misses = 0;       // streaming batches in a row that brought <= 1
  static constexpr std::uint8_t probe_every = 8;
  static constexpr std::uint8_t stream_misses = 4;
  void readable() noexcept { drained = false; }
  bool has_held() const noexcept { return held.count != 0 || held_err != Result::Ok; }
  Result next(MessagePoolBase& pool, std::uint32_t max_payload, Message& frame, wire::Header& h) noexcept;
  void reset(Loop& loop) noexcept;
};

inline Result send_control(int fd, wire::FrameType type, std::uint32_t txn, std::uint8_t flags, const void* payload,
                           std::uint32_t len) noexcept;

// Reads the server's answer to a client's hello from `fd`. The status is the
// transport's (WouldBlock, Closed, SystemError) or BadFrame/TooLarge for a
// frame that is not a Welcome or Refuse (or came with an fd); when it is Ok,
// `answer` is Ok for a Welcome, or the Result a Refuse carries (BadFrame for
// a code this build does not know).
inline Result read_answer(int fd, Result& answer) noexcept;

// An error code from the peer must be one we know; anything else is a bad frame.
inline bool known_result(std::int32_t code) noexcept {
  return code > 0 && code < result_count;
}

}  // namespace detail

// -- implementation --

namespace detail {

inline Result send_control(int fd, wire::FrameType type, std::uint32_t txn, std::uint8_t flags, const void* payload,
                           std::uint32_t len) noexcept {
  unsigned char buf[wire::header_size + 8 + LEMSG_MAX_PROTOCOL_ID];
  if (len > sizeof buf - wire::header_size) return Result::BadParameter;
  wire::encode(wire::Header{type, flags, txn, len}, buf);
  if (len) std::memcpy(buf + wire::header_size, payload, len);
  return send_datagram(fd, buf, wire::header_size + len, -1);
}

inline Result read_answer(int fd, Result& answer) noexcept {
  answer = Result::BadFrame;
  unsigned char buf[wire::header_size + 4];
  std::size_t len = 0;
  int rfd = -1;
  Result r = recv_datagram(fd, buf, sizeof buf, len, rfd);
  if (r != Result::Ok) return r;
  if (rfd >= 0) {
    ::close(rfd);
    return Result::BadFrame;
  }
  wire::Header h;
  r = wire::decode(buf, len, 0, h);
  if (r != Result::Ok) return r;
  if (h.type == wire::FrameType::Welcome) {
    answer = Result::Ok;
    return Result::Ok;
  }
  if (h.type != wire::FrameType::Refuse) return Result::BadFrame;
  std::int32_t code;
  std::memcpy(&code, buf + wire::header_size, 4);
  if (known_result(code)) answer = static_cast<Result>(code);
  return Result::Ok;
}

inline Result Channel::send(Loop& loop, Message& m, wire::FrameType type, std::uint32_t txn,
                            std::uint8_t flags) noexcept {
  MsgBlock* b = m.blk_;
  if (b->fd >= 0) flags = static_cast<std::uint8_t>(flags | wire::FlagFd);
  wire::encode(wire::Header{type, flags, txn, b->size}, b->header);
  if (out.count == 0) {
    const Result r = send_datagram(fd, b->header, wire::header_size + b->size, b->fd);
    if (r == Result::Ok) {
      m.release();
      return r;
    }
    if (r != Result::WouldBlock) return r;
  }
  if (out.count == LEMSG_MAX_OUTGOING) return Result::Overflow;
  if (out.count == 0) stall_deadline = now_ns() + static_cast<std::int64_t>(stall_ms) * 1000000;
  out.push(m);
  update_events(loop);
  return Result::Ok;
}

inline Result Channel::flush(Loop& loop) noexcept {
  bool moved = false;
  while (out.count) {
    MsgBlock* b = out.first;
    const Result r = send_datagram(fd, b->header, wire::header_size + b->size, b->fd);
    if (r == Result::WouldBlock) break;
    if (r != Result::Ok) return r;
    Message sent;
    out.pop(sent);
    moved = true;
  }
  // The peer read something: it has a new stall timeout for what is left.
  if (out.count == 0) stall_deadline = 0;
  else if (moved) stall_deadline = now_ns() + static_cast<std::int64_t>(stall_ms) * 1000000;
  update_events(loop);
  return Result::Ok;
}

inline Result Channel::next(MessagePoolBase& pool, std::uint32_t max_payload, Message& frame,
                            wire::Header& h) noexcept {
  if (held.count == 0 && held_err == Result::Ok && !drained) {
    const std::size_t cap = wire::header_size + pool.max_payload();
    std::size_t ask = want;
    if (ask == 1 && ++lone_reads >= probe_every) {
      lone_reads = 0;
      ask = 2;
    }
    if (ask == 1) {
      // A lone frame, straight into the caller's message: one block, one
      // recvmsg(), and the next frame (if any) wakes the loop again.
      Message m;
      Result r = pool.create(m);
      if (r != Result::Ok) return Result::PoolEmpty;
      std::size_t len = 0;
      int rfd = -1;
      r = recv_datagram(fd, m.blk_->header, cap, len, rfd);
      if (r == Result::Ok) r = take_frame(m.blk_, len, rfd, max_payload, h);
      if (r == Result::Ok || r == Result::WouldBlock) drained = true;
      if (r == Result::Ok) {
        frame.release();
        frame.blk_ = m.blk_;
        m.blk_ = nullptr;
      }
      return r;
    }
    // A batch: the blocks asked for, each queued in `held` or released here.
    Message blk[max_batch];
    std::size_t asked = 0;
    for (; asked < ask; ++asked)
      if (pool.create(blk[asked]) != Result::Ok) break;
    if (asked == 0) return Result::PoolEmpty;
    Datagram d[max_batch];
    std::size_t got = 0;
    Result r;
    if (asked == 1) {
      d[0] = Datagram{blk[0].blk_->header, cap, 0, -1, Result::Ok};
      r = recv_datagram(fd, d[0].buf, cap, d[0].len, d[0].fd);
      d[0].result = r;
      if (r == Result::Ok) got = 1;
      else if (r == Result::BadFrame || r == Result::TooLarge) got = 1;  // refused: ends the batch below
    } else {
      for (std::size_t i = 0; i < asked; ++i) d[i] = Datagram{blk[i].blk_->header, cap, 0, -1, Result::Ok};
      r = recv_datagrams(fd, d, asked, got);
    }
    for (std::size_t i = 0; i < got; ++i) {
      // (A datagram the transport refused has had its fds closed already.)
      Result ri = d[i].result;
      wire::Header fh;
      if (ri == Result::Ok) ri = take_frame(blk[i].blk_, d[i].len, d[i].fd, max_payload, fh);
      // Nothing after a bad frame is delivered: the session is closing. The
      // blocks not handed out are released when `blk` goes, with any fd they took.
      if (held_err == Result::Ok && ri != Result::Ok) held_err = ri;
      if (held_err == Result::Ok) held.push(blk[i]);
    }
    if (r != Result::Ok && r != Result::WouldBlock) {
      if (held_err == Result::Ok) held_err = r;
    } else if (asked == 1) {
      drained = true;  // a lone frame (or none): the next one wakes the loop again
    } else {
      // A batch: size the next one by what this one brought.
      if (got >= 2) {
        misses = 0;
        want = static_cast<std::uint8_t>(got * 2 > max_batch ? max_batch : got * 2);
      } else if (want > 1 && ++misses < stream_misses) {
        want = 2;
      } else {
        want = 1;
        misses = 0;
      }
      // Only a batch of max_batch frames reads on in this wake-up.
      drained = got < max_batch;
    }
  }
  if (held.count) {
    frame.release();
    held.pop(frame);
    const MsgBlock* b = frame.blk_;
    h = wire::Header{static_cast<wire::FrameType>(b->frame_type), b->frame_flags, b->txn,
                     (b->frame_flags & wire::FlagError) ? 4u : b->size};
    return Result::Ok;
  }
  if (held_err != Result::Ok) {
    const Result r = held_err;
    held_err = Result::Ok;
    return r;
  }
  return Result::WouldBlock;
}

inline bool Channel::set_wait(int ms) noexcept {
  if (!blocking) return false;
  if (ms == rcvtimeo_ms) return true;  // the usual case: the same timeout as last time, no syscall
  struct timeval tv;
  tv.tv_sec = ms / 1000;
  tv.tv_usec = (ms % 1000) * 1000;
  if (::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0) return false;
  rcvtimeo_ms = ms;
  return true;
}

inline Result Channel::receive(MessagePoolBase& pool, std::uint32_t max_payload, Message& frame,
                               wire::Header& h, bool wait) noexcept {
  Message m;
  Result r = pool.create(m);
  if (r != Result::Ok) return r;
  std::size_t len = 0;
  int rfd = -1;
  r = recv_datagram(fd, m.blk_->header, wire::header_size + pool.max_payload(), len, rfd, wait);
  if (r != Result::Ok) return r;
  r = take_frame(m.blk_, len, rfd, max_payload, h);
  if (r == Result::Ok) frame = std::move(m);
  return r;
}

inline Result Channel::take_frame(MsgBlock* b, std::size_t len, int rfd, std::uint32_t max_payload,
                                  wire::Header& h) noexcept {
  Result r = wire::decode(b->header, len, max_payload, h);
  // The fd flag must match what arrived: an fd nobody announced is refused.
  if (r == Result::Ok && ((h.flags & wire::FlagFd) != 0) != (rfd >= 0)) r = Result::BadFrame;
  if (r == Result::Ok && rfd >= 0 && refuse_unix_fds && is_unix_socket(rfd)) r = Result::BadFrame;
  if (r != Result::Ok) {
    if (rfd >= 0) ::close(rfd);
    return r;
  }
  b->size = h.length;
  b->fd = rfd;
  b->txn = h.txn;
  b->frame_type = static_cast<std::uint8_t>(h.type);
  b->frame_flags = h.flags;
  if (h.flags & wire::FlagError) {
    // An error response carries its Result in place of a payload.
    std::memcpy(&b->status, payload_of(b), 4);
    b->size = 0;
  }
  return Result::Ok;
}

inline void Channel::reset(Loop& loop) noexcept {
  if (watch) {
    Result r = loop.remove_watch(watch);
    (void)r;
    watch = WatchId{};
  }
  if (fd >= 0) ::close(fd);
  fd = -1;
  out.clear();
  stall_deadline = 0;
  held.clear();
  held_err = Result::Ok;
  drained = false;
  want = 1;
  lone_reads = 0;
  misses = 0;
  starved = false;
  blocking = false;
  rcvtimeo_ms = 0;
}

}  // namespace detail

// The service directory's records (section 13 describes them); here, so
// that Service and Session can speak to the directory.
namespace detail {
namespace dirwire {

enum : std::uint8_t {
  Register = 1,
  Open = 2,
  Connect = 3,
  List = 4,
  Registered = 0x81,
  Answer = 0x82,
  HandOff = 0x83,
  Entry = 0x84,
  End = 0x85,
};
enum : std::uint8_t { FlagWait = 1, FlagProbe = 2, FlagHello = 4 };
enum : std::uint8_t { KindService = 1, KindWaiting = 2, KindBinding = 3 };

constexpr std::size_t max_text = LEMSG_MAX_NAME > LEMSG_MAX_PROTOCOL_ID ? LEMSG_MAX_NAME : LEMSG_MAX_PROTOCOL_ID;
constexpr std::size_t fixed = 20;
constexpr std::size_t max_frame = wire::header_size + fixed + LEMSG_MAX_NAME + max_text;

struct Record {
  std::uint8_t op = 0;
  std::uint8_t flags = 0;
  std::uint32_t a = 0, b = 0, c = 0, d = 0;
  char name[LEMSG_MAX_NAME + 1] = {};
  char text[max_text + 1] = {};
};

inline void set_text(char* out, std::size_t cap, const char* in) noexcept {
  std::size_t n = in ? std::strlen(in) : 0;
  if (n >= cap) n = cap - 1;
  if (n) std::memcpy(out, in, n);
  out[n] = '\0';
}

// Sends `r` (with `pass_fd` when >= 0). As send_datagram.
inline Result send(int fd, const Record& r, int pass_fd = -1) noexcept {
  unsigned char buf[max_frame];
  const std::size_t nl = std::strlen(r.name), tl = std::strlen(r.text);
  const std::uint32_t len = static_cast<std::uint32_t>(fixed + nl + tl);
  wire::encode(wire::Header{wire::FrameType::Message, static_cast<std::uint8_t>(pass_fd >= 0 ? wire::FlagFd : 0), 0, len},
               buf);
  unsigned char* p = buf + wire::header_size;
  p[0] = r.op;
  p[1] = r.flags;
  p[2] = static_cast<unsigned char>(nl);
  p[3] = static_cast<unsigned char>(tl);
  std::memcpy(p + 4, &r.a, 4);
  std::memcpy(p + 8, &r.b, 4);
  std::memcpy(p + 12, &r.c, 4);
  std::memcpy(p + 16, &r.d, 4);
  std::memcpy(p + fixed, r.name, nl);
  std::memcpy(p + fixed + nl, r.text, tl);
  return send_datagram(fd, buf, wire::header_size + len, pass_fd);
}

// Checks and decodes one received datagram. Ok or BadFrame. An fd must come
// with HandOff and only with it.
inline Result decode(const unsigned char* buf, std::size_t n, bool has_fd, Record& r) noexcept {
  wire::Header h;
  if (wire::decode(buf, n, static_cast<std::uint32_t>(fixed + LEMSG_MAX_NAME + max_text), h) != Result::Ok ||
      h.type != wire::FrameType::Message || h.length < fixed)
    return Result::BadFrame;
  const unsigned char* p = buf + wire::header_size;
  const std::size_t nl = p[2], tl = p[3];
  if (nl > LEMSG_MAX_NAME || tl > max_text || h.length != fixed + nl + tl) return Result::BadFrame;
  if (((h.flags & wire::FlagFd) != 0) != has_fd || has_fd != (p[0] == HandOff)) return Result::BadFrame;
  r.op = p[0];
  r.flags = p[1];
  std::memcpy(&r.a, p + 4, 4);
  std::memcpy(&r.b, p + 8, 4);
  std::memcpy(&r.c, p + 12, 4);
  std::memcpy(&r.d, p + 16, 4);
  std::memcpy(r.name, p + fixed, nl);
  r.name[nl] = '\0';
  std::memcpy(r.text, p + fixed + nl, tl);
  r.text[tl] = '\0';
  // No NUL inside a name or a text: what is checked is what is used.
  if (std::strlen(r.name) != nl || std::strlen(r.text) != tl) return Result::BadFrame;
  if (nl && !valid_name(r.name)) return Result::BadFrame;
  return Result::Ok;
}

// Receives one record. Ok with `fd_out` (-1 or the HandOff's fd), or the
// transport's WouldBlock, Closed, SystemError, or BadFrame (every fd closed).
inline Result recv(int fd, Record& r, int& fd_out, bool own_sockets = false) noexcept {
  unsigned char buf[max_frame];
  std::size_t n = 0;
  Result res = recv_datagram(fd, buf, sizeof buf, n, fd_out, false, own_sockets);
  if (res == Result::TooLarge) res = Result::BadFrame;
  if (res != Result::Ok) return res;
  res = decode(buf, n, fd_out >= 0, r);
  if (res != Result::Ok && fd_out >= 0) {
    ::close(fd_out);
    fd_out = -1;
  }
  return res;
}

// Waits for one record until `deadline` (now_ns). Ok, Timeout, Closed,
// BadFrame, SystemError. An fd that arrives is closed (BadFrame).
inline Result wait(int fd, Record& r, std::int64_t deadline) noexcept {
  for (;;) {
    struct pollfd p = {fd, POLLIN, 0};
    const int rc = ::poll(&p, 1, ms_until(deadline));
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) return Result::SystemError;
    if (rc == 0) return Result::Timeout;
    int got = -1;
    const Result res = recv(fd, r, got);
    if (res == Result::WouldBlock) continue;
    if (got >= 0) {
      ::close(got);
      return Result::BadFrame;
    }
    return res;
  }
}

// An Answer's or Registered's Result code, checked: one this build knows.
inline Result answer_code(std::uint32_t a) noexcept {
  const std::int32_t code = static_cast<std::int32_t>(a);
  return code == 0 ? Result::Ok : known_result(code) ? static_cast<Result>(code) : Result::BadFrame;
}

// Connects to the directory at `path` and sends `req`. Ok with `fd`;
// NotFound (no directory listening), Busy (its backlog is full),
// NotPermitted, UnsafeRuntimeDir, SystemError.
inline Result ask(const char* path, const Record& req, int& fd) noexcept {
  fd = -1;
  Result r = check_socket_dir(path);
  if (r == Result::Ok) r = connect_to(path, fd);
  if (r != Result::Ok) return r;
  r = send(fd, req);
  if (r == Result::Closed) r = Result::NotFound;  // it went away at once
  if (r != Result::Ok) {
    ::close(fd);
    fd = -1;
  }
  return r;
}

}  // namespace dirwire
}  // namespace detail

// =============================================================================
// 10. Service                                                        >>service
// =============================================================================
//
// The server end: advertise(name) makes <runtime dir>/<name>; open, close and
// receive handlers; per-session context and credentials; send to one
// session; respond to requests. Connections wait in a handshake table until
// their hello arrives, and only then take a session slot.

/// Who may open a Service: the socket file's mode and group, and an
/// optional allow-list.
struct ServiceOptions {
  /// The socket file's mode (the umask does not apply). With the default
  /// 0660, the service's user and the file's group may connect.
  mode_t mode = 0660;
  /// When either list is set, only a peer whose uid is in `uids` or whose gid
  /// is in `gids` (from SO_PEERCRED) is let in; others get NotPermitted.
  /// The arrays must outlive the advertisement.
  const uid_t* uids = nullptr;
  std::size_t uid_count = 0;
  const gid_t* gids = nullptr;
  std::size_t gid_count = 0;
  /// The socket file's group (chown), to let one group in through `mode`;
  /// gid_t(-1), the default, leaves the process's group. Unless it runs as
  /// root, the process must be a member of the group (else NotPermitted).
  gid_t group = static_cast<gid_t>(-1);
  /// Whether a client may send a Unix socket as a message's fd. Off by
  /// default: a server that keeps such an fd may be keeping the client's own
  /// end of its connection (or another session's), and then never sees the
  /// client die. Even when on, a socket connected to this process is refused:
  /// the session is closed with BadFrame.
  bool accept_socket_fds = false;
  /// A session whose client read nothing for this long while frames waited
  /// for it is closed with Stalled. 0 = LEMSG_STALL_TIMEOUT_MS.
  std::uint32_t stall_timeout_ms = 0;
  /// Direct (a socket file) or through the service directory; Auto reads
  /// LEMSG_DIRECTORY at advertise() (see Discovery and section 13). In
  /// directory mode `mode` and `group` do not apply (there is no socket
  /// file); the allow-list does.
  Discovery discovery = Discovery::Auto;
};

using OpenHandler = Callable<void(SessionRef)>;
/// Server side: the session, and why it closed: Closed (client closed or
/// died), Ok (this side closed it), BadFrame or TooLarge (bad input),
/// Overflow (client stopped reading and a response could not be queued),
/// Stalled (client read nothing for the stall timeout while frames waited).
/// It runs only for sessions that opened: a connection that never sent a
/// good hello is closed without it.
using CloseHandler = Callable<void(SessionRef, Result reason)>;
using ReceiveHandler = Callable<void(Message&)>;
/// Releases one entry a closing session owned in a tracked RefMap.
using TrackRelease = Callable<void(void* obj, std::uint32_t ref)>;

namespace detail {

// Every call into user code goes through Lifeline::call, because any handler
// may destroy the object that called it (Legato code deletes a session in its
// close handler). Each call puts a Witness on the caller's stack; the
// object's Lifeline member marks every Witness still on its chain dead when
// it is destroyed, so the caller learns, from its own stack, whether `this`
// still exists, and returns at once without touching it when not.
struct Witness {
  bool alive = true;
  Witness* below = nullptr;
};
class Lifeline {
 public:
  Lifeline() noexcept = default;
  Lifeline(const Lifeline&) = delete;
  Lifeline& operator=(const Lifeline&) = delete;
  // Runs after the owner's destructor body, whose own handler calls have
  // returned by then: what is left are calls the destruction came from.
  ~Lifeline() {
    for (Witness* w = top_; w; w = w->below) w->alive = false;
  }
  // Calls f(); true when the owner survived it. On false the caller must
  // return without touching the owner (its members, `this`, anything).
  // (g++ 12 warns that top_ may keep &w after the return on the false path;
  // there the owner, top_ with it, no longer exists.)
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdangling-pointer"
#endif
  template <typename F>
  bool call(F&& f) noexcept {
    Witness w;
    w.below = top_;
    top_ = &w;
    f();
    if (!w.alive) return false;
    top_ = w.below;
    return true;
  }
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#pragma GCC diagnostic pop
#endif

 private:
  Witness* top_ = nullptr;
};

// The services of this process, so a synchronous call can see that only its
// own thread could answer it.
// Every member has an initialiser, so the registry is constant-initialised:
// its function-local static needs no guard (a guard links the C++
// exception runtime into a static build).
struct LocalService {
  char path[sizeof(sockaddr_un::sun_path)] = {};
  const Loop* loop = nullptr;
  pid_t pid = 0;
};
struct LocalRegistry {
  Mutex mutex;
  LocalService entries[LEMSG_MAX_SERVICES];
};
inline LocalRegistry& local_registry() noexcept {
  static LocalRegistry reg;
  return reg;
}
// An entry is removed by the slot registry_add gave, never by path: a failed
// second advertisement of a name must not remove the first one's entry.
inline Result registry_add(const char* path, const Loop* loop, int& slot) noexcept;
inline void registry_remove(int slot) noexcept;
inline bool served_by_this_thread(const char* path) noexcept;

}  // namespace detail

/// The server end of an interface. Owned by the caller, used on its Loop's
/// thread; must outlive the messages it received. At most LEMSG_MAX_SESSIONS
/// sessions at once; a client beyond that is refused with SessionTableFull,
/// and one whose uid already holds LEMSG_MAX_SESSIONS_PER_UID of them with
/// UidShareFull (uid 0 and the service's own uid are not limited: they could
/// stop the service anyway). A connection takes a session slot only once its
/// hello arrived: until then it waits in a table of LEMSG_MAX_HANDSHAKES
/// (LEMSG_MAX_HANDSHAKES_PER_UID per uid) for at most LEMSG_OPEN_TIMEOUT_MS,
/// and when that table (or the loop's watch table) is full the oldest waiting
/// connection is closed to make room, so silent connections cannot lock
/// other clients out. Each session, like each waiting connection, takes one
/// of the loop's watches.
///
/// Lifetime: create it after its Loop and pool and destroy it before them
/// (their destructors stop the program otherwise). Any handler may destroy
/// the Service (or close sessions); the library touches nothing of it
/// afterwards. A received request may outlive the Service: releasing it then
/// answers nothing (the Service's destructor closed its session anyway).
///
/// Introspection (section 13, query_info and Monitor): every Service answers
/// the info query by itself, to uid 0 and to its own uid only (others get
/// NotPermitted, whatever the allow-list says; the allow-list and the session
/// tables do not apply to them): its name, protocol, mode, sessions (uid,
/// gid, pid, requests not yet answered, frames queued), pool blocks in use,
/// high water and capacity, and counters (requests, responses, one-way
/// messages both ways, bad frames, sessions opened and closed by reason,
/// refusals). The same users may attach up to LEMSG_MAX_MONITORS monitors,
/// which get one record per frame the service receives from or sends (or
/// queues) to a session. A monitor costs a watch of the loop while attached;
/// records go out with one non-blocking send each, and a monitor whose
/// socket is full (it does not read) or gone is dropped at once (logged at
/// Info): the service never waits for one. With no monitor attached a frame
/// costs one test of a counter. Neither takes a session slot or calls a
/// handler.
class Service {
 public:
  Service(Loop& loop, const Protocol& protocol, MessagePoolBase& pool) noexcept;
  /// Closes every session (close handler with Ok) and hides the service.
  /// May run inside one of its own handlers; a close handler that destroys
  /// the Service again while this runs must do nothing (as std::optional::
  /// reset and std::unique_ptr::reset do).
  ~Service();
  Service(const Service&) = delete;
  Service& operator=(const Service&) = delete;

  /// Ok when constructed fine; BadParameter (protocol id empty or too long,
  /// max_payload above the pool's), TooBigForSocket (a frame of max_payload
  /// bytes cannot be one datagram on this system: see detail::probe_datagram;
  /// up to about 208 KiB always can), SystemError or TimerTableFull
  /// otherwise. Every call below returns this error while it is not Ok.
  Result status() const noexcept { return status_; }

  /// Listens on <runtime dir>/<name>, creating a missing runtime dir with
  /// mode 0755. Of several processes advertising one name at once exactly
  /// one gets Ok. Ok; BadParameter (name); Busy (already advertised);
  /// Duplicate (another live server has the name, or a file that is not a
  /// socket does: it is never replaced); NotPermitted (a socket file we may
  /// not probe, or options.group is not ours to give); NoRuntimeDir (the
  /// runtime dir cannot be created or written: set LEMSG_RUNTIME_DIR or
  /// create it owned by this user); UnsafeRuntimeDir (another user owns or
  /// may write it, see the transport section); WatchTableFull;
  /// ServiceTableFull; SystemError.
  ///
  /// In directory mode (options.discovery, or LEMSG_DIRECTORY) it registers
  /// `name` with the directory instead and waits up to LEMSG_OPEN_TIMEOUT_MS
  /// for its answer: Ok; Duplicate (registered already by another server);
  /// NotPermitted (a binding gives the name to another user's service);
  /// RegistryFull; BadParameter; UnsafeRuntimeDir. With no directory running
  /// (or one that does not answer) it is Ok, and the Service registers when
  /// the directory comes, as it does again whenever the directory restarts
  /// (after 50 ms, doubling to 1 s); its sessions carry on meanwhile.
  Result advertise(const char* name, const ServiceOptions& options = ServiceOptions{}) noexcept;
  /// Stops accepting and removes the socket file; open sessions go on. Only
  /// the process that advertised removes the file, and only while it is the
  /// file it created: in a forked child (also when the child's exit runs the
  /// destructor) hide() just closes the child's copy. Ok or NotFound.
  Result hide() noexcept;
  bool is_advertised() const noexcept { return listen_fd_ >= 0 || dir_mode_; }
  /// In directory mode: whether the directory has the name registered now.
  bool is_registered() const noexcept { return reg_fd_ >= 0 && !reg_pending_; }

  void set_open_handler(OpenHandler h) noexcept { open_handler_ = std::move(h); }
  void set_close_handler(CloseHandler h) noexcept { close_handler_ = std::move(h); }
  void set_receive_handler(ReceiveHandler h) noexcept { receive_handler_ = std::move(h); }

  /// When a session closes (for any reason), every entry of `map` whose owner
  /// is that session's SessionRef value is removed and passed to `release`.
  /// Ok; BadParameter (no `release`); Duplicate (`map` is tracked already);
  /// TrackTableFull (raise LEMSG_MAX_TRACKED); or status()'s error.
  Result track(RefMapBase& map, TrackRelease release) noexcept;

  /// Per-session context pointer. Ok or NotFound.
  Result set_context(SessionRef s, void* ctx) noexcept;
  /// nullptr when none or when the session does not exist.
  void* context(SessionRef s) const noexcept;
  /// The client's uid, gid and pid. Ok or NotFound.
  Result credentials(SessionRef s, Credentials& out) const noexcept;

  /// A message from this service's pool. Ok or PoolEmpty.
  Result create_message(Message& out) noexcept { return status_ != Result::Ok ? status_ : pool_.create(out); }
  /// Sends a one-way message to a session. Ok (the message is consumed);
  /// NotFound; BadParameter (not a created message, or shared); TooLarge;
  /// TooBigForSocket (the socket refused the datagram);
  /// Overflow (LEMSG_MAX_OUTGOING frames already wait); Closed. On failure
  /// the message is still the caller's.
  Result send(SessionRef s, Message&& m) noexcept;
  /// Answers a request with the message's payload (and fd), consuming `m`,
  /// so a request is answered at most once. Ok; Closed when its session is
  /// gone (harmless; the message is consumed); BadParameter when `m` is empty
  /// (already responded), shared (copies exist), or not a request received
  /// here; TooLarge; TooBigForSocket or SystemError when the socket refuses
  /// the datagram (the client's request then completes with that Result and
  /// `m` is consumed); Overflow when the response cannot even be queued (the
  /// session is closed).
  Result respond(Message&& m) noexcept;
  /// Closes a session; the close handler runs with Ok. Ok or NotFound.
  Result close(SessionRef s) noexcept;

  std::size_t session_count() const noexcept { return peer_refs_.size(); }
  /// Calls f(SessionRef) for every open session. f must not close sessions.
  template <typename F>
  void for_each_session(F&& f) const {
    peer_refs_.for_each([&](const Peer* p, std::uint32_t ref) {
      if (p->open) f(SessionRef{ref});
    });
  }
  Loop& loop() noexcept { return loop_; }
  const Protocol& protocol() const noexcept { return protocol_; }

 private:
  friend class Message;
  friend struct detail::TypedAccess;
  struct Peer {
    detail::Channel ch;
    Credentials creds;
    void* context = nullptr;
    std::uint64_t events = 0;  // typed events this session subscribed to (bit = item index)
    std::uint32_t pending = 0;  // requests received and not answered yet (info query)
    bool used = false;
    bool open = false;
    bool closing = false;
  };
  // A connection whose hello has not arrived: no session slot, no Peer.
  struct Handshake {
    int fd = -1;
    WatchId watch;
    Credentials creds;
    std::int64_t deadline = 0;  // closed when the hello is not here by then
    std::uint64_t seq = 0;      // accept order: the smallest is the oldest
    bool used = false;
  };
  struct Tracked {
    RefMapBase* map = nullptr;
    TrackRelease release;
  };

  // Functions returning bool call user code: false means the Service was
  // destroyed meanwhile, and the caller returns without touching it.
  void on_listen(short revents) noexcept;
  void pause_accepting(int error) noexcept;
  void on_peer(std::uint32_t ref, short revents) noexcept;
  bool share_applies(uid_t uid) const noexcept { return uid != 0 && uid != own_uid_; }
  Result session_room(const Credentials& c) const noexcept;
  void refuse(int fd, const Credentials& c, Result why) noexcept;
  void add_handshake(int fd, const Credentials& c) noexcept;
  int drop_handshake(std::uint32_t ref) noexcept;
  void evict_handshake(std::uint32_t ref, const char* why) noexcept;
  void on_handshake(std::uint32_t ref) noexcept;
  Result read_hello(int fd, const Credentials& c) noexcept;
  bool on_hello(int fd, const Credentials& c, Result hello) noexcept;
  void on_timer() noexcept;
  void reschedule() noexcept;
  // Hands a received frame of session `ref` to the receive handler (a
  // request is then the application's to answer). False: the Service is gone.
  bool deliver(std::uint32_t ref, Message& m, bool request) noexcept;
  // A frame was sent or queued: when it started a queue, the timer must
  // see the queue's stall deadline.
  void watch_stall(const Peer& p) noexcept {
    if (p.ch.out.count == 1) reschedule();
  }
  bool close_peer(std::uint32_t ref, Result reason) noexcept;  // false: the Service is gone
  // The advertised name (also after hide()), else the protocol id: for logs.
  const char* log_name() const noexcept {
    return dir_mode_ ? dir_name_ : path_[0] ? std::strrchr(path_, '/') + 1 : protocol_.id;
  }
  // Directory mode: registration and the connections the directory hands over.
  Result advertise_directory(const char* name, const ServiceOptions& options, const char* dir_path) noexcept;
  void register_again() noexcept;
  detail::dirwire::Record register_request(const char* name) const noexcept;
  void lose_directory(const char* why) noexcept;
  void close_registration() noexcept;  // closes the registration connection, if any
  void on_registration() noexcept;
  // A connection accepted or handed over: checked, then its hello read (or
  // it waits in the handshake table). True when a handler ran (the caller
  // then returns: the Service may be gone). `hello`: a HandOff that carries
  // the client's hello (the directory read it from the socket while the
  // client waited): max payload in d, protocol id in text.
  bool admit(int fd, const detail::dirwire::Record* hello = nullptr) noexcept;
  // The hello's content against this service (or an introspection id).
  Result check_hello(std::uint32_t max, const unsigned char* id, std::uint32_t idlen) noexcept;
  bool allowed(const Credentials& c) const noexcept;
  void answer_error(std::uint32_t session, std::uint32_t txn, Result code) noexcept;
  // Typed interfaces: answers request `m` with an error code instead of a
  // response (Ok, Closed or BadParameter, as respond); a session's event
  // subscriptions, and the sessions subscribed to one (out may be nullptr).
  Result respond_error(Message&& m, Result code) noexcept;
  Result set_events(SessionRef s, std::uint64_t bits) noexcept;
  std::size_t subscribers(std::uint64_t bit, SessionRef* out) const noexcept;
  static void unanswered(void* svc, std::uint32_t session, std::uint32_t txn) noexcept {
    static_cast<Service*>(svc)->request_done(session);
    static_cast<Service*>(svc)->answer_error(session, txn, Result::Unanswered);
  }

  Loop& loop_;
  Protocol protocol_;
  MessagePoolBase& pool_;
  Result status_ = Result::Ok;
  ReceiveHandler receive_handler_;
  OpenHandler open_handler_;
  CloseHandler close_handler_;
  ServiceOptions options_;
  int listen_fd_ = -1;
  WatchId listen_watch_;
  // Out of fds (EMFILE...): the listening socket stays readable, so its
  // watch is paused and a timer retries, backing off up to a second.
  std::int64_t accept_retry_ = 0;       // when to listen again; 0 = not paused
  std::uint32_t accept_backoff_ms_ = 0;  // 0 = accepting normally
  TimerId timer_;
  char path_[sizeof(sockaddr_un::sun_path)] = {};
  int registry_slot_ = -1;  // this process's service table (WouldDeadlock checks)
  int sndbuf_ = 0;          // SO_SNDBUF each session's socket needs (0: the default)
  detail::SocketFile file_;  // the socket file advertise() made
  pid_t owner_pid_ = 0;      // the process that made it
  Peer peers_[LEMSG_MAX_SESSIONS];
  detail::HandleMap<Peer, LEMSG_MAX_SESSIONS> peer_refs_;
  Handshake handshakes_[LEMSG_MAX_HANDSHAKES];
  detail::HandleMap<Handshake, LEMSG_MAX_HANDSHAKES> handshake_refs_;
  std::uint64_t accept_seq_ = 0;
  bool evict_logged_ = false;  // one warning per flood; reset when the table empties
  uid_t own_uid_ = ::geteuid();
  // Directory mode.
  bool dir_mode_ = false;
  bool reg_pending_ = false;   // Register sent, Registered not read yet
  int reg_fd_ = -1;            // the registration connection
  WatchId reg_watch_;
  std::int64_t reg_retry_ = 0;  // when to register again; 0 = not waiting to
  std::uint32_t reg_backoff_ms_ = 0;
  char dir_path_[sizeof(sockaddr_un::sun_path)] = {};
  char dir_name_[LEMSG_MAX_NAME + 1] = {};
  Tracked tracked_[LEMSG_MAX_TRACKED];
  // Introspection (section 13): the info query's counters and the monitors.
  struct MonitorSlot {
    int fd = -1;  // -1: free
    WatchId watch;
    std::uint32_t payload = 0;  // payload bytes it gets per record
    pid_t pid = 0;
  };
  enum : int { IntroNone = 0, IntroInfo, IntroMonitor };
  // The hello read_hello() just read named a reserved id: which, and its
  // max payload field (the monitor's payload bytes). on_hello() takes it.
  int intro_kind_ = IntroNone;
  std::uint32_t intro_arg_ = 0;
  std::uint64_t counters_[wire::info_counter_count] = {};
  MonitorSlot monitors_[LEMSG_MAX_MONITORS];
  std::uint32_t monitor_count_ = 0;  // the only thing a frame tests when none is attached
  void serve_intro(int fd, const Credentials& c, int kind, std::uint32_t arg) noexcept;
  void send_info(int fd) noexcept;
  void attach_monitor(int fd, const Credentials& c, std::uint32_t payload) noexcept;
  void drop_monitor(std::size_t i, const char* why, bool dropped) noexcept;
  // Shows every monitor one frame: its wire header and payload bytes.
  void monitor_frame(bool out, std::uint32_t ref, const unsigned char* header, const unsigned char* payload) noexcept;
  void monitor_block(bool out, std::uint32_t ref, const detail::MsgBlock* b) noexcept;
  // Sends or queues on a session's channel; with monitors attached, shows
  // them the frame when it went or was queued.
  Result channel_send(Peer& p, std::uint32_t ref, Message& m, wire::FrameType type, std::uint32_t txn,
                      std::uint8_t flags) noexcept {
    if (!monitor_count_) return p.ch.send(loop_, m, type, txn, flags);
    return send_monitored(p, ref, m, type, txn, flags);
  }
  Result send_monitored(Peer& p, std::uint32_t ref, Message& m, wire::FrameType type, std::uint32_t txn,
                        std::uint8_t flags) noexcept;
  // A request of session `ref` was answered (or let go): one fewer pending.
  void request_done(std::uint32_t ref) noexcept {
    Peer* p = peer_refs_.lookup(ref);
    if (p && p->pending) --p->pending;
  }
  static std::uint32_t close_counter(Result reason) noexcept;
  detail::Lifeline life_;
};

// -- implementation --

namespace detail {

inline Result registry_add(const char* path, const Loop* loop, int& slot) noexcept {
  slot = -1;
  LocalRegistry& reg = local_registry();
  std::lock_guard<detail::Mutex> lock(reg.mutex);
  const pid_t me = ::getpid();
  for (int i = 0; i < LEMSG_MAX_SERVICES; ++i) {
    LocalService& e = reg.entries[i];
    // Entries a forked child inherited from its parent are free to reuse.
    if (e.loop != nullptr && e.pid == me) continue;
    std::snprintf(e.path, sizeof e.path, "%s", path);
    e.loop = loop;
    e.pid = me;
    slot = i;
    return Result::Ok;
  }
  return Result::ServiceTableFull;
}

inline void registry_remove(int slot) noexcept {
  if (slot < 0 || slot >= LEMSG_MAX_SERVICES) return;
  LocalRegistry& reg = local_registry();
  std::lock_guard<detail::Mutex> lock(reg.mutex);
  LocalService& e = reg.entries[slot];
  if (e.pid == ::getpid()) e.loop = nullptr;
}

inline bool served_by_this_thread(const char* path) noexcept {
  LocalRegistry& reg = local_registry();
  std::lock_guard<detail::Mutex> lock(reg.mutex);
  for (const LocalService& e : reg.entries)
    if (e.loop && e.pid == ::getpid() && std::strcmp(e.path, path) == 0 && e.loop->on_owner_thread()) return true;
  return false;
}

}  // namespace detail

inline Service::Service(Loop& loop, const Protocol& protocol, MessagePoolBase& pool) noexcept
    : loop_(loop), protocol_(protocol), pool_(pool) {
  ++loop_.users_;
  ++pool_.users_;
  status_ = detail::check_protocol("service", protocol, pool);
  if (status_ != Result::Ok) return;
  status_ = detail::probe_datagram(wire::header_size + protocol.max_payload, sndbuf_);
  if (status_ != Result::Ok) {
    LEMSG_LOG(Error, "service %s: frames of %lu bytes cannot travel: %s", protocol.id,
              static_cast<unsigned long>(wire::header_size + protocol.max_payload), to_string(status_));
    return;
  }
  status_ = loop_.add_timer([this] { on_timer(); }, timer_);
}

inline Service::~Service() {
  std::uint32_t refs[LEMSG_MAX_SESSIONS];
  std::size_t n = 0;
  peer_refs_.for_each([&](Peer*, std::uint32_t ref) { refs[n++] = ref; });
  // A handler cannot destroy the Service again from here (a second
  // destruction is the caller's bug), so the results need no check.
  for (std::size_t i = 0; i < n; ++i) (void)close_peer(refs[i], Result::Ok);
  std::uint32_t shakes[LEMSG_MAX_HANDSHAKES];
  n = 0;
  handshake_refs_.for_each([&](Handshake*, std::uint32_t ref) { shakes[n++] = ref; });
  for (std::size_t i = 0; i < n; ++i) {
    const int fd = drop_handshake(shakes[i]);
    if (fd >= 0) ::close(fd);
  }
  for (std::size_t i = 0; i < LEMSG_MAX_MONITORS; ++i) drop_monitor(i, "the service is going", false);
  Result r = hide();
  (void)r;
  if (timer_) r = loop_.remove_timer(timer_);
  pool_.detach(this);
  --pool_.users_;
  --loop_.users_;
}

inline Result Service::advertise(const char* name, const ServiceOptions& options) noexcept {
  if (status_ != Result::Ok) return status_;
  if (listen_fd_ >= 0) return Result::Busy;
  char path[sizeof path_];
  Result r = detail::socket_path(name, path);
  if (r != Result::Ok) return r;
  if ((options.uid_count && !options.uids) || (options.gid_count && !options.gids)) return Result::BadParameter;
  if (dir_mode_) return Result::Busy;
  {
    char dir_path[sizeof dir_path_];
    if (detail::directory_mode(options.discovery, dir_path)) return advertise_directory(name, options, dir_path);
  }
  const char* dir = runtime_dir();
  if (::mkdir(dir, 0755) == 0) {
    // mkdir's mode passes through the umask (077 would shut every other user
    // out, whatever the socket's mode): set it explicitly.
    if (::chmod(dir, 0755) != 0)
      LEMSG_LOG(Warning, "service %s: cannot set the mode of %s: %s", name, dir, std::strerror(errno));
  } else if (errno != EEXIST) {
    const int e = errno;
    LEMSG_LOG(Error, "service %s: cannot create the runtime dir %s: %s (set LEMSG_RUNTIME_DIR, or create it owned by this user)",
              name, dir, std::strerror(e));
    return (e == EACCES || e == EPERM || e == EROFS || e == ENOENT) ? Result::NoRuntimeDir : Result::SystemError;
  }
  r = detail::check_socket_dir(path);
  if (r == Result::NotFound) r = Result::NoRuntimeDir;  // deleted since the mkdir
  if (r != Result::Ok) return r;
  if (detail::served_by_this_thread(path)) return Result::Duplicate;
  r = detail::registry_add(path, &loop_, registry_slot_);
  if (r != Result::Ok) return r;
  int fd = -1;
  detail::SocketFile file;
  r = detail::listen_at(path, options.mode, fd, options.group, &file);
  if (r == Result::Ok) {
    r = loop_.add_watch(fd, Readable, [this](int, short ev) { on_listen(ev); }, listen_watch_);
    if (r != Result::Ok) {
      bool removed = detail::remove_socket_file(path, file);
      (void)removed;
      ::close(fd);
    }
  }
  if (r != Result::Ok) {
    detail::registry_remove(registry_slot_);
    registry_slot_ = -1;
    return r;
  }
  std::memcpy(path_, path, sizeof path_);
  listen_fd_ = fd;
  file_ = file;
  owner_pid_ = ::getpid();
  options_ = options;
  LEMSG_LOG(Info, "service %s: advertised at %s", log_name(), path_);
  return Result::Ok;
}

inline Result Service::advertise_directory(const char* name, const ServiceOptions& options,
                                          const char* dir_path) noexcept {
  if (!dir_path[0]) return Result::BadParameter;
  namespace dw = detail::dirwire;
  int fd = -1;
  Result r = dw::ask(dir_path, register_request(name), fd);
  if (r == Result::Ok) {
    dw::Record a;
    const Result w =
        dw::wait(fd, a, detail::now_ns() + static_cast<std::int64_t>(LEMSG_OPEN_TIMEOUT_MS) * 1000000);
    r = w != Result::Ok ? w : a.op == dw::Registered ? dw::answer_code(a.a) : Result::BadFrame;
    if (r == Result::Ok) r = loop_.add_watch(fd, Readable, [this](int, short) { on_registration(); }, reg_watch_);
    if (r != Result::Ok) ::close(fd);
    if (r == Result::Duplicate || r == Result::NotPermitted || r == Result::RegistryFull ||
        r == Result::BadParameter || r == Result::WatchTableFull) {
      LEMSG_LOG(Warning, "service %s: the directory %s refused it: %s", name, dir_path, to_string(r));
      return r;
    }
  } else if (r != Result::NotFound && r != Result::Busy) {
    return r;  // UnsafeRuntimeDir, NotPermitted, SystemError
  }
  std::memcpy(dir_path_, dir_path, sizeof dir_path_);
  dw::set_text(dir_name_, sizeof dir_name_, name);
  dir_mode_ = true;
  options_ = options;
  owner_pid_ = ::getpid();
  reg_backoff_ms_ = 0;
  if (r == Result::Ok) {
    reg_fd_ = fd;
    LEMSG_LOG(Info, "service %s: registered with the directory %s", name, dir_path);
  } else {
    LEMSG_LOG(Info, "service %s: no directory at %s yet (%s); registering when it comes", name, dir_path,
              to_string(r));
    lose_directory(nullptr);
  }
  return Result::Ok;
}

inline void Service::close_registration() noexcept {
  if (reg_fd_ >= 0) {
    Result r = loop_.remove_watch(reg_watch_);
    (void)r;
    ::close(reg_fd_);
  }
  reg_fd_ = -1;
  reg_watch_ = WatchId{};
  reg_pending_ = false;
}

inline void Service::lose_directory(const char* why) noexcept {
  close_registration();
  if (why) LEMSG_LOG(Warning, "service %s: directory connection lost (%s); registering again", log_name(), why);
  reg_backoff_ms_ = reg_backoff_ms_ == 0 ? 50 : (reg_backoff_ms_ * 2 > 1000 ? 1000 : reg_backoff_ms_ * 2);
  reg_retry_ = detail::now_ns() + static_cast<std::int64_t>(reg_backoff_ms_) * 1000000;
  reschedule();
}

inline detail::dirwire::Record Service::register_request(const char* name) const noexcept {
  detail::dirwire::Record req;
  req.op = detail::dirwire::Register;
  req.a = protocol_.max_payload;
  detail::dirwire::set_text(req.name, sizeof req.name, name);
  detail::dirwire::set_text(req.text, sizeof req.text, protocol_.id);
  return req;
}

inline void Service::register_again() noexcept {
  namespace dw = detail::dirwire;
  int fd = -1;
  Result r = dw::ask(dir_path_, register_request(dir_name_), fd);
  if (r == Result::Ok) {
    r = loop_.add_watch(fd, Readable, [this](int, short) { on_registration(); }, reg_watch_);
    if (r != Result::Ok) ::close(fd);
  }
  if (r != Result::Ok) {
    LEMSG_LOG(Debug, "service %s: directory %s: %s", log_name(), dir_path_, to_string(r));
    lose_directory(nullptr);
    return;
  }
  reg_fd_ = fd;
  reg_pending_ = true;  // its answer comes on the watch
}

inline void Service::on_registration() noexcept {
  namespace dw = detail::dirwire;
  for (int n = 0; n < 16 && reg_fd_ >= 0; ++n) {
    dw::Record rec;
    int fd = -1;
    // A socket connected to this process is let through: a client of ours
    // handed over by the directory (its hello is checked like anyone's).
    const Result r = dw::recv(reg_fd_, rec, fd, true);
    if (r == Result::WouldBlock) return;
    if (r != Result::Ok) {
      lose_directory(to_string(r));
      return;
    }
    if (reg_pending_ && rec.op == dw::Registered && fd < 0) {
      const Result code = dw::answer_code(rec.a);
      if (code != Result::Ok) {
        LEMSG_LOG(Error, "service %s: the directory refused to register it again: %s", log_name(), to_string(code));
        lose_directory(nullptr);
        return;
      }
      reg_pending_ = false;
      reg_backoff_ms_ = 0;
      LEMSG_LOG(Info, "service %s: registered with the directory %s again", log_name(), dir_path_);
      continue;
    }
    if (reg_pending_ || rec.op != dw::HandOff || fd < 0 || !detail::is_unix_socket(fd)) {
      if (fd >= 0) ::close(fd);
      lose_directory("unexpected frame");
      return;
    }
    if (admit(fd, (rec.flags & dw::FlagHello) ? &rec : nullptr)) return;  // a handler ran: the next one waits
  }
}

inline Result Service::hide() noexcept {
  if (dir_mode_) {
    // Closing the registration is the directory's signal: it unregisters us.
    close_registration();
    reg_retry_ = 0;
    dir_mode_ = false;
    reschedule();
    return Result::Ok;
  }
  if (listen_fd_ < 0) return Result::NotFound;
  Result r = loop_.remove_watch(listen_watch_);
  (void)r;
  listen_watch_ = WatchId{};
  // Removed while still listening, so no other advertiser can take the name
  // in between; and only by the process that made it, only if it is the
  // file it made (not a forked child's copy, not a newer server's file).
  if (owner_pid_ == ::getpid() && !detail::remove_socket_file(path_, file_))
    LEMSG_LOG(Info, "service %s: %s is no longer ours; left in place", log_name(), path_);
  ::close(listen_fd_);
  listen_fd_ = -1;
  accept_retry_ = 0;
  accept_backoff_ms_ = 0;
  detail::registry_remove(registry_slot_);
  registry_slot_ = -1;
  return Result::Ok;
}

inline Result Service::track(RefMapBase& map, TrackRelease release) noexcept {
  if (status_ != Result::Ok) return status_;
  if (!release) return Result::BadParameter;
  for (Tracked& t : tracked_) {
    if (t.map == &map) return Result::Duplicate;
  }
  for (Tracked& t : tracked_) {
    if (t.map) continue;
    t.map = &map;
    t.release = std::move(release);
    return Result::Ok;
  }
  return Result::TrackTableFull;
}

inline Result Service::set_context(SessionRef s, void* ctx) noexcept {
  Peer* p = peer_refs_.lookup(s.value);
  if (!p) return Result::NotFound;
  p->context = ctx;
  return Result::Ok;
}

inline void* Service::context(SessionRef s) const noexcept {
  const Peer* p = peer_refs_.lookup(s.value);
  return p ? p->context : nullptr;
}

inline Result Service::credentials(SessionRef s, Credentials& out) const noexcept {
  const Peer* p = peer_refs_.lookup(s.value);
  if (!p) return Result::NotFound;
  out = p->creds;
  return Result::Ok;
}

inline bool Service::allowed(const Credentials& c) const noexcept {
  if (options_.uid_count == 0 && options_.gid_count == 0) return true;
  for (std::size_t i = 0; i < options_.uid_count; ++i)
    if (options_.uids[i] == c.uid) return true;
  for (std::size_t i = 0; i < options_.gid_count; ++i)
    if (options_.gids[i] == c.gid) return true;
  return false;
}

inline void Service::on_listen(short revents) noexcept {
  (void)revents;
  // Accept a bounded batch; the rest wait for the next dispatch.
  for (int i = 0; i < 16 && listen_fd_ >= 0; ++i) {
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      const int e = errno;
      if (e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM) pause_accepting(e);
      else if (e != EAGAIN && e != EWOULDBLOCK && e != EINTR && e != ECONNABORTED)
        LEMSG_LOG(Warning, "service %s: accept failed: %s", log_name(), std::strerror(e));
      return;
    }
    if (accept_backoff_ms_) {
      LEMSG_LOG(Info, "service %s: accepting again", log_name());
      accept_backoff_ms_ = 0;
    }
    // An open handler may have run: the rest of the backlog waits for the
    // next dispatch (the socket stays readable).
    if (admit(fd)) return;
  }
}

inline bool Service::admit(int fd, const detail::dirwire::Record* hello) noexcept {
  Credentials c;
  Result r = detail::peer_credentials(fd, c);
  if (r != Result::Ok) r = Result::SystemError;
  // Root and our own uid may query or monitor whatever the allow-list and
  // the tables say: for them both are checked at the hello (on_hello).
  else if (!share_applies(c.uid)) r = Result::Ok;
  else if (!allowed(c)) r = Result::NotPermitted;
  else r = session_room(c);
  if (r != Result::Ok) {
    refuse(fd, c, r);
    return false;
  }
  if (hello) {
    r = check_hello(hello->d, reinterpret_cast<const unsigned char*>(hello->text),
                    static_cast<std::uint32_t>(std::strlen(hello->text)));
    return on_hello(fd, c, r);
  }
  // A client sends its hello right after connecting, so it is usually
  // here already; only a client that is slow (or silent) waits in the
  // handshake table.
  r = read_hello(fd, c);
  if (r == Result::WouldBlock) {
    add_handshake(fd, c);
    return false;
  }
  return on_hello(fd, c, r);
}

inline void Service::pause_accepting(int error) noexcept {
  // The connection stays in the backlog, so the listening socket stays
  // readable: without a pause every poll would return at once. One warning
  // per episode; the retries back off from 50 ms to a second.
  if (accept_backoff_ms_ == 0) {
    LEMSG_LOG(Warning, "service %s: accept failed: %s; pausing accepts until it succeeds", log_name(),
              std::strerror(error));
    accept_backoff_ms_ = 50;
  } else {
    accept_backoff_ms_ = accept_backoff_ms_ * 2 > 1000 ? 1000 : accept_backoff_ms_ * 2;
  }
  Result r = loop_.set_events(listen_watch_, 0);
  (void)r;
  accept_retry_ = detail::now_ns() + static_cast<std::int64_t>(accept_backoff_ms_) * 1000000;
  reschedule();
}

inline Result Service::session_room(const Credentials& c) const noexcept {
  if (peer_refs_.size() >= LEMSG_MAX_SESSIONS) return Result::SessionTableFull;
  if (!share_applies(c.uid)) return Result::Ok;
  std::size_t mine = 0;
  peer_refs_.for_each([&](const Peer* p, std::uint32_t) {
    if (p->creds.uid == c.uid) ++mine;
  });
  return mine >= LEMSG_MAX_SESSIONS_PER_UID ? Result::UidShareFull : Result::Ok;
}

inline void Service::refuse(int fd, const Credentials& c, Result why) noexcept {
  LEMSG_LOG(Warning, "service %s: refusing pid %ld uid %ld: %s", log_name(), static_cast<long>(c.pid),
            static_cast<long>(c.uid), to_string(why));
  const std::int32_t code = static_cast<std::int32_t>(why);
  Result r = detail::send_control(fd, wire::FrameType::Refuse, 0, wire::FlagError, &code, 4);
  (void)r;
  ::close(fd);
  ++counters_[wire::CountRefused];
}

inline void Service::add_handshake(int fd, const Credentials& c) noexcept {
  // Silent connections must not lock others out: a uid beyond its share
  // loses its own oldest handshake, and a full table loses the oldest of all.
  auto oldest = [&](bool same_uid, std::size_t& count) {
    std::uint32_t ref = 0;
    std::uint64_t seq = 0;
    count = 0;
    handshake_refs_.for_each([&](const Handshake* h, std::uint32_t r) {
      if (same_uid && h->creds.uid != c.uid) return;
      ++count;
      if (!ref || h->seq < seq) {
        ref = r;
        seq = h->seq;
      }
    });
    return ref;
  };
  std::size_t count = 0;
  if (share_applies(c.uid)) {
    const std::uint32_t ref = oldest(true, count);
    if (count >= LEMSG_MAX_HANDSHAKES_PER_UID) evict_handshake(ref, "its uid's share of handshakes is full");
  }
  if (handshake_refs_.size() >= LEMSG_MAX_HANDSHAKES) evict_handshake(oldest(false, count), "the handshake table is full");
  Handshake* slot = nullptr;
  for (Handshake& h : handshakes_)
    if (!h.used) {
      slot = &h;
      break;
    }
  std::uint32_t ref = 0;
  if (!slot || handshake_refs_.add(slot, ref) != Result::Ok) {
    refuse(fd, c, Result::Busy);  // only when the map's generations ran out
    return;
  }
  Result r = loop_.add_watch(fd, Readable, [this, ref](int, short) { on_handshake(ref); }, slot->watch);
  if (r == Result::WatchTableFull && handshake_refs_.size() > 1) {
    // The loop's watches are the limit: a silent connection's watch is worth less.
    std::uint32_t victim = 0;
    std::uint64_t seq = 0;
    handshake_refs_.for_each([&](const Handshake* h, std::uint32_t hr) {
      if (hr != ref && h->used && (!victim || h->seq < seq)) {
        victim = hr;
        seq = h->seq;
      }
    });
    if (victim) {
      evict_handshake(victim, "the loop's watch table is full");
      r = loop_.add_watch(fd, Readable, [this, ref](int, short) { on_handshake(ref); }, slot->watch);
    }
  }
  if (r != Result::Ok) {
    Result rr = handshake_refs_.remove(ref);
    (void)rr;
    refuse(fd, c, r);
    return;
  }
  slot->used = true;
  slot->fd = fd;
  slot->creds = c;
  slot->seq = ++accept_seq_;
  slot->deadline = detail::now_ns() + static_cast<std::int64_t>(LEMSG_OPEN_TIMEOUT_MS) * 1000000;
  reschedule();
}

inline int Service::drop_handshake(std::uint32_t ref) noexcept {
  Handshake* h = handshake_refs_.lookup(ref);
  if (!h) return -1;
  Result r = loop_.remove_watch(h->watch);
  (void)r;
  r = handshake_refs_.remove(ref);
  const int fd = h->fd;
  h->watch = WatchId{};
  h->fd = -1;
  h->used = false;
  if (handshake_refs_.size() == 0) evict_logged_ = false;
  return fd;
}

inline void Service::evict_handshake(std::uint32_t ref, const char* why) noexcept {
  Handshake* h = handshake_refs_.lookup(ref);
  if (!h) return;
  // One warning per flood, not one per connection.
  if (!evict_logged_) {
    LEMSG_LOG(Warning, "service %s: closing the oldest connection still without a hello (pid %ld uid %ld): %s",
              log_name(), static_cast<long>(h->creds.pid), static_cast<long>(h->creds.uid), why);
  } else {
    LEMSG_LOG(Debug, "service %s: closing the oldest connection still without a hello (pid %ld uid %ld): %s",
              log_name(), static_cast<long>(h->creds.pid), static_cast<long>(h->creds.uid), why);
  }
  const int fd = drop_handshake(ref);
  evict_logged_ = true;  // until the table empties by other means
  if (fd >= 0) ::close(fd);
}

inline void Service::on_handshake(std::uint32_t ref) noexcept {
  Handshake* h = handshake_refs_.lookup(ref);
  if (!h) return;
  const Credentials c = h->creds;
  const Result r = read_hello(h->fd, c);
  if (r == Result::WouldBlock) return;
  const int fd = drop_handshake(ref);
  reschedule();  // its deadline no longer counts
  bool opened = on_hello(fd, c, r);
  (void)opened;
}

inline Result Service::read_hello(int fd, const Credentials& c) noexcept {
  unsigned char buf[wire::header_size + 8 + LEMSG_MAX_PROTOCOL_ID];
  std::size_t len = 0;
  int rfd = -1;
  Result r = detail::recv_datagram(fd, buf, sizeof buf, len, rfd);
  if (r == Result::WouldBlock) return r;
  if (rfd >= 0) {
    ::close(rfd);
    r = Result::BadFrame;
  }
  wire::Header h;
  if (r == Result::Ok) r = wire::decode(buf, len, 0, h);
  if (r == Result::Ok && h.type != wire::FrameType::Hello) r = Result::BadFrame;
  std::uint32_t max = 0, idlen = 0;
  if (r == Result::Ok) {
    std::memcpy(&max, buf + wire::header_size, 4);
    std::memcpy(&idlen, buf + wire::header_size + 4, 4);
    if (idlen != h.length - 8) r = Result::BadFrame;
  }
  if (r != Result::Ok) {
    if (r != Result::Closed)
      LEMSG_LOG(Warning, "service %s: bad hello from pid %ld: %s", log_name(), static_cast<long>(c.pid),
                to_string(r));
    if (r == Result::BadFrame || r == Result::TooLarge) ++counters_[wire::CountBadFrames];
    return r == Result::TooLarge ? Result::BadFrame : r;
  }
  return check_hello(max, buf + wire::header_size + 8, idlen);
}

inline Result Service::check_hello(std::uint32_t max, const unsigned char* id, std::uint32_t idlen) noexcept {
  if (idlen == sizeof wire::info_id - 1 && std::memcmp(id, wire::info_id, idlen) == 0) intro_kind_ = IntroInfo;
  if (idlen == sizeof wire::monitor_id - 1 && std::memcmp(id, wire::monitor_id, idlen) == 0)
    intro_kind_ = IntroMonitor;
  if (intro_kind_ != IntroNone) {
    intro_arg_ = max;
    return Result::Ok;
  }
  if (idlen != std::strlen(protocol_.id) || std::memcmp(id, protocol_.id, idlen) != 0)
    return Result::ProtocolMismatch;
  if (max != protocol_.max_payload) return Result::SizeMismatch;
  return Result::Ok;
}

// Completes a handshake whose hello read as `hello`: a good one opens a
// session (true: the open handler ran), anything else closes `fd`.
inline bool Service::on_hello(int fd, const Credentials& c, Result hello) noexcept {
  const int intro = intro_kind_;
  intro_kind_ = IntroNone;
  if (intro != IntroNone && hello == Result::Ok) {
    serve_intro(fd, c, intro, intro_arg_);
    return false;
  }
  if (hello == Result::ProtocolMismatch || hello == Result::SizeMismatch) {
    refuse(fd, c, hello);
    return false;
  }
  if (hello != Result::Ok) {
    ::close(fd);  // gone, or a bad hello (logged)
    return false;
  }
  // The tables may have filled while this client was slow (and root and our
  // own uid were not checked at accept).
  Result r = allowed(c) ? session_room(c) : Result::NotPermitted;
  Peer* slot = nullptr;
  std::uint32_t ref = 0;
  if (r == Result::Ok) {
    for (Peer& p : peers_)
      if (!p.used) {
        slot = &p;
        break;
      }
    if (!slot || peer_refs_.add(slot, ref) != Result::Ok) r = Result::SessionTableFull;
  }
  if (r == Result::Ok) {
    r = loop_.add_watch(fd, Readable, [this, ref](int, short ev) { on_peer(ref, ev); }, slot->ch.watch);
    if (r != Result::Ok) {
      Result rr = peer_refs_.remove(ref);
      (void)rr;
    }
  }
  if (r != Result::Ok) {
    refuse(fd, c, r);
    return false;
  }
  slot->used = true;
  slot->open = false;
  slot->closing = false;
  slot->context = nullptr;
  slot->events = 0;
  slot->pending = 0;
  slot->creds = c;
  slot->ch.fd = fd;
  detail::set_send_buffer(fd, sndbuf_);
  slot->ch.refuse_unix_fds = !options_.accept_socket_fds;
  slot->ch.stall_ms = options_.stall_timeout_ms ? options_.stall_timeout_ms : LEMSG_STALL_TIMEOUT_MS;
  r = detail::send_control(fd, wire::FrameType::Welcome, 0, 0, nullptr, 0);
  if (r != Result::Ok) {
    (void)close_peer(ref, r);
    return false;
  }
  slot->open = true;
  ++counters_[wire::CountOpened];
  LEMSG_LOG(Info, "service %s: session opened for pid %ld uid %ld gid %ld (%lu open)", log_name(),
            static_cast<long>(c.pid), static_cast<long>(c.uid), static_cast<long>(c.gid),
            static_cast<unsigned long>(peer_refs_.size()));
  if (open_handler_) {
    // The handler may destroy the Service: the callers return at once.
    OpenHandler h = open_handler_;
    (void)life_.call([&] { h(SessionRef{ref}); });
  }
  return true;
}

inline void Service::on_peer(std::uint32_t ref, short revents) noexcept {
  Peer* p = peer_refs_.lookup(ref);
  if (!p) return;
  if (revents & POLLOUT) {
    const Result r = p->ch.flush(loop_);
    if (r != Result::Ok) {
      (void)close_peer(ref, Result::Closed);
      return;
    }
  }
  if (!(revents & (POLLIN | POLLHUP | POLLERR))) return;
  p->ch.readable();
  // A bounded batch per dispatch keeps one busy client from starving others;
  // frames already read from the socket are always handed out.
  for (int i = 0; i < 16 || p->ch.has_held(); ++i) {
    p = peer_refs_.lookup(ref);
    if (!p || p->closing) return;
    Message m;
    wire::Header h;
    Result r = p->ch.next(pool_, protocol_.max_payload, m, h);
    if (r == Result::WouldBlock) return;
    if (r == Result::PoolEmpty) {
      // Leave the frame in the socket; the timer retries once blocks free up.
      p->ch.starved = true;
      p->ch.update_events(loop_);
      if ((revents & POLLHUP) && !(revents & POLLIN)) (void)close_peer(ref, Result::Closed);
      else reschedule();
      return;
    }
    if (r == Result::Ok && h.type != wire::FrameType::Message && h.type != wire::FrameType::Request)
      r = Result::BadFrame;
    if (r != Result::Ok) {
      if (r != Result::Closed)
        LEMSG_LOG(Warning, "service %s: closing session of pid %ld: %s", log_name(),
                  static_cast<long>(p->creds.pid), to_string(r));
      if (r == Result::BadFrame || r == Result::TooLarge) ++counters_[wire::CountBadFrames];
      (void)close_peer(ref, r);
      return;
    }
    if (h.type == wire::FrameType::Request) {
      ++counters_[wire::CountRequests];
      ++p->pending;
    } else {
      ++counters_[wire::CountMessagesIn];
    }
    if (monitor_count_) monitor_block(false, ref, m.blk_);
    if (!deliver(ref, m, h.type == wire::FrameType::Request)) return;
  }
}

inline bool Service::deliver(std::uint32_t ref, Message& m, bool request) noexcept {
  detail::MsgBlock* b = m.blk_;
  b->session = ref;
  if (request) {
    b->kind = detail::MsgKind::Request;
    b->service = this;
    b->unanswered = &Service::unanswered;
  } else {
    b->kind = detail::MsgKind::Received;
  }
  if (!receive_handler_) {
    LEMSG_LOG(Debug, "service %s: no receive handler; frame released", log_name());
    return life_.call([&] { m.release(); });
  }
  ReceiveHandler h = receive_handler_;  // a copy: the handler may replace itself
  // Releasing a request the handler left unanswered answers it, which may
  // close the session and run the close handler: inside the call.
  return life_.call([&] {
    h(m);
    m.release();
  });
}

inline void Service::answer_error(std::uint32_t session, std::uint32_t txn, Result code) noexcept {
  Peer* p = peer_refs_.lookup(session);
  if (!p || !p->open || p->closing) return;
  Message m;
  const std::int32_t c = static_cast<std::int32_t>(code);
  Result r = pool_.create(m);
  if (r == Result::Ok) {
    r = m.assign(&c, 4);
    if (r == Result::Ok) r = channel_send(*p, session, m, wire::FrameType::Response, txn, wire::FlagError);
    if (r == Result::Ok) watch_stall(*p);
  } else if (p->ch.out.count == 0) {
    r = detail::send_control(p->ch.fd, wire::FrameType::Response, txn, wire::FlagError, &c, 4);
    if (r == Result::Ok && monitor_count_) {
      unsigned char head[wire::header_size];
      wire::encode(wire::Header{wire::FrameType::Response, wire::FlagError, txn, 4}, head);
      monitor_frame(true, session, head, reinterpret_cast<const unsigned char*>(&c));
    }
  } else {
    r = Result::Overflow;
  }
  if (r == Result::WouldBlock) r = Result::Overflow;
  if (r == Result::Ok) ++counters_[wire::CountResponses];
  // Called from Message::release(), which touches no Service afterwards.
  if (r != Result::Ok) (void)close_peer(session, r == Result::Overflow ? Result::Overflow : Result::Closed);
}

inline Result Service::send(SessionRef s, Message&& m) noexcept {
  if (status_ != Result::Ok) return status_;
  if (!m || m.blk_->kind != detail::MsgKind::Outgoing || m.is_shared())
    return Result::BadParameter;
  if (m.size() > protocol_.max_payload) return Result::TooLarge;
  Peer* p = peer_refs_.lookup(s.value);
  if (!p || !p->open || p->closing) return Result::NotFound;
  const Result r = channel_send(*p, s.value, m, wire::FrameType::Message, 0, 0);
  if (r == Result::Ok) {
    ++counters_[wire::CountMessagesOut];
    watch_stall(*p);
  }
  return r;
}

inline Result Service::respond(Message&& m) noexcept {
  if (status_ != Result::Ok) return status_;
  detail::MsgBlock* b = m.blk_;
  if (!b || b->kind != detail::MsgKind::Request || b->service != this) return Result::BadParameter;
  if (b->responded) return Result::BadParameter;
  if (m.is_shared()) return Result::BadParameter;
  b->responded = true;
  if (b->size > protocol_.max_payload) {
    b->responded = false;
    return Result::TooLarge;
  }
  Peer* p = peer_refs_.lookup(b->session);
  if (!p || !p->open || p->closing) {
    m.release();
    return Result::Closed;
  }
  const std::uint32_t ref = b->session;
  const std::uint32_t txn = b->txn;
  const std::uint32_t size = b->size;
  b->kind = detail::MsgKind::Outgoing;
  if (p->pending) --p->pending;
  const Result r = channel_send(*p, ref, m, wire::FrameType::Response, txn, 0);
  if (r == Result::Ok) {
    ++counters_[wire::CountResponses];
    watch_stall(*p);
    return r;
  }
  m.release();
  if (r == Result::Overflow) {
    // A peer that stopped reading is closed now: a response is never
    // dropped silently.
    (void)close_peer(ref, Result::Overflow);  // nothing of the Service is touched after it
    return r;
  }
  // A dead peer's hang-up closes the session from the loop.
  if (r == Result::Closed) return r;
  // The socket refused this response (too large for its buffer, too many
  // fds in flight, no buffer space): the client's request still completes,
  // with the reason, and the session goes on.
  LEMSG_LOG(Warning, "service %s: a response of %lu bytes could not be sent: %s", log_name(),
            static_cast<unsigned long>(size), to_string(r));
  answer_error(ref, txn, r);
  return r;
}

inline Result Service::respond_error(Message&& m, Result code) noexcept {
  detail::MsgBlock* b = m.blk_;
  if (!b || b->kind != detail::MsgKind::Request || b->service != this || b->responded || m.is_shared() ||
      code == Result::Ok)
    return Result::BadParameter;
  b->responded = true;
  const std::uint32_t session = b->session;
  const std::uint32_t txn = b->txn;
  m.release();
  request_done(session);
  const Peer* p = peer_refs_.lookup(session);
  if (!p || !p->open || p->closing) return Result::Closed;
  answer_error(session, txn, code);  // closes the session when even that cannot be sent
  return Result::Ok;
}

inline Result Service::set_events(SessionRef s, std::uint64_t bits) noexcept {
  Peer* p = peer_refs_.lookup(s.value);
  if (!p) return Result::NotFound;
  p->events = bits;
  return Result::Ok;
}

inline std::size_t Service::subscribers(std::uint64_t bit, SessionRef* out) const noexcept {
  std::size_t n = 0;
  peer_refs_.for_each([&](const Peer* p, std::uint32_t ref) {
    if (!p->open || p->closing || !(p->events & bit)) return;
    if (out) out[n] = SessionRef{ref};
    ++n;
  });
  return n;
}

inline Result Service::close(SessionRef s) noexcept {
  Peer* p = peer_refs_.lookup(s.value);
  if (!p || p->closing) return Result::NotFound;
  (void)close_peer(s.value, Result::Ok);  // nothing of the Service is touched after it
  return Result::Ok;
}

inline bool Service::close_peer(std::uint32_t ref, Result reason) noexcept {
  Peer* p = peer_refs_.lookup(ref);
  if (!p || p->closing) return true;
  p->closing = true;
  if (p->open)
    LEMSG_LOG(Info, "service %s: session of pid %ld closed: %s", log_name(), static_cast<long>(p->creds.pid),
              reason == Result::Ok ? "closed by this side" : to_string(reason));
  if (p->open) ++counters_[close_counter(reason)];
  // Stop the socket first, so nothing a handler does below can reach it.
  p->ch.reset(loop_);
  if (p->open && close_handler_) {
    CloseHandler h = close_handler_;
    // Destroyed here: the tracked maps may have gone with the Service, so
    // they are left alone.
    if (!life_.call([&] { h(SessionRef{ref}, reason); })) return false;
  }
  for (Tracked& t : tracked_) {
    if (!t.map) continue;
    // From a copy: a release that destroys the Service must not destroy the
    // callable that runs, and the rest of this map's entries still go to it.
    RefMapBase* map = t.map;
    TrackRelease release = t.release;
    if (!life_.call([&] {
          map->release_owner_ptr(
              ref, [](void* obj, std::uint32_t r, void* ctx) { (*static_cast<TrackRelease*>(ctx))(obj, r); },
              &release);
        }))
      return false;
  }
  Result r = peer_refs_.remove(ref);
  (void)r;
  p->used = false;
  p->open = false;
  p->closing = false;
  p->context = nullptr;
  return true;
}

inline void Service::reschedule() noexcept {
  std::int64_t next = 0;
  const std::int64_t now = detail::now_ns();
  auto consider = [&](std::int64_t t) {
    if (t && (!next || t < next)) next = t;
  };
  peer_refs_.for_each([&](Peer* p, std::uint32_t) {
    if (p->ch.starved) consider(now + 5 * 1000000);
    consider(p->ch.stall_deadline);
  });
  handshake_refs_.for_each([&](Handshake* h, std::uint32_t) { consider(h->deadline); });
  if (accept_retry_ && (!next || accept_retry_ < next)) next = accept_retry_;
  if (reg_retry_ && (!next || reg_retry_ < next)) next = reg_retry_;
  Result r = next ? loop_.arm_timer(timer_, static_cast<std::uint32_t>(detail::ms_until(next)))
                  : loop_.disarm_timer(timer_);
  (void)r;
}

inline void Service::on_timer() noexcept {
  const std::int64_t now = detail::now_ns();
  if (accept_retry_ && accept_retry_ <= now && listen_fd_ >= 0) {
    // Listen again: the next poll tries accept(), which pauses again if fds are still short.
    accept_retry_ = 0;
    Result r = loop_.set_events(listen_watch_, Readable);
    (void)r;
  }
  if (reg_retry_ && reg_retry_ <= now && dir_mode_) {
    reg_retry_ = 0;
    register_again();
  }
  std::uint32_t late[LEMSG_MAX_HANDSHAKES];
  std::size_t n = 0;
  handshake_refs_.for_each([&](Handshake* h, std::uint32_t ref) {
    if (h->deadline <= now) late[n++] = ref;
  });
  for (std::size_t i = 0; i < n; ++i) {
    LEMSG_LOG(Warning, "service %s: client sent no hello in time; closing", log_name());
    const int fd = drop_handshake(late[i]);
    if (fd >= 0) ::close(fd);
  }
  std::uint32_t stalled[LEMSG_MAX_SESSIONS];
  std::size_t n_stalled = 0;
  peer_refs_.for_each([&](Peer* p, std::uint32_t ref) {
    // Whatever keeps its socket alive (a copy in another process, an fd in
    // flight), a client that reads nothing while frames wait is gone.
    if (p->open && p->ch.out.count && p->ch.stall_deadline && p->ch.stall_deadline <= now) stalled[n_stalled++] = ref;
    if (p->ch.starved && pool_.available()) {
      p->ch.starved = false;
      p->ch.update_events(loop_);
    }
  });
  for (std::size_t i = 0; i < n_stalled; ++i) {
    const Peer* p = peer_refs_.lookup(stalled[i]);
    if (!p) continue;  // a close handler above closed it already
    LEMSG_LOG(Warning, "service %s: pid %ld read nothing for %lu ms while frames waited; closing", log_name(),
              static_cast<long>(p->creds.pid), static_cast<unsigned long>(p->ch.stall_ms));
    if (!close_peer(stalled[i], Result::Stalled)) return;  // a close handler destroyed the Service
  }
  reschedule();
}

// -- introspection: the info query and the monitors (section 13 is the client) --

namespace detail {
inline void put32(unsigned char* at, std::uint32_t v) noexcept { std::memcpy(at, &v, 4); }
inline void put64(unsigned char* at, std::uint64_t v) noexcept { std::memcpy(at, &v, 8); }
inline std::uint32_t get32(const unsigned char* at) noexcept {
  std::uint32_t v;
  std::memcpy(&v, at, 4);
  return v;
}
inline std::uint64_t get64(const unsigned char* at) noexcept {
  std::uint64_t v;
  std::memcpy(&v, at, 8);
  return v;
}
}  // namespace detail

inline std::uint32_t Service::close_counter(Result reason) noexcept {
  switch (reason) {
    case Result::Closed: return wire::CountClosedByClient;
    case Result::Ok: return wire::CountClosedHere;
    case Result::BadFrame: return wire::CountClosedBadFrame;
    case Result::TooLarge: return wire::CountClosedTooLarge;
    case Result::Overflow: return wire::CountClosedOverflow;
    case Result::Stalled: return wire::CountClosedStalled;
    default: return wire::CountClosedOther;
  }
}

inline void Service::serve_intro(int fd, const Credentials& c, int kind, std::uint32_t arg) noexcept {
  if (c.uid != 0 && c.uid != own_uid_) {
    refuse(fd, c, Result::NotPermitted);
    return;
  }
  if (kind == IntroInfo) {
    LEMSG_LOG(Debug, "service %s: info query from pid %ld uid %ld", log_name(), static_cast<long>(c.pid),
              static_cast<long>(c.uid));
    send_info(fd);
    ::close(fd);
    return;
  }
  attach_monitor(fd, c, arg);
}

inline void Service::send_info(int fd) noexcept {
  // On the stack: about 24 bytes per LEMSG_MAX_SESSIONS (1.8 KiB by default).
  unsigned char buf[wire::header_size + wire::info_max_size];
  unsigned char* rec = buf + wire::header_size;
  const char* name = dir_mode_ ? dir_name_ : path_[0] ? std::strrchr(path_, '/') + 1 : "";
  std::size_t name_len = std::strlen(name);
  if (name_len > LEMSG_MAX_NAME) name_len = 0;  // never: advertise checked it
  const std::size_t id_len = std::strlen(protocol_.id);
  std::uint32_t sessions = 0;
  unsigned char* at = rec + wire::info_fixed_size + name_len + id_len;
  peer_refs_.for_each([&](const Peer* p, std::uint32_t ref) {
    if (!p->open || p->closing || sessions >= LEMSG_MAX_SESSIONS) return;
    detail::put32(at, ref);
    detail::put32(at + 4, static_cast<std::uint32_t>(p->creds.pid));
    detail::put32(at + 8, static_cast<std::uint32_t>(p->creds.uid));
    detail::put32(at + 12, static_cast<std::uint32_t>(p->creds.gid));
    detail::put32(at + 16, p->pending);
    detail::put32(at + 20, static_cast<std::uint32_t>(p->ch.out.count));
    at += wire::info_session_size;
    ++sessions;
  });
  detail::put32(rec, 1);
  detail::put32(rec + 4, dir_mode_ ? 1 : 0);
  detail::put32(rec + 8, protocol_.max_payload);
  detail::put32(rec + 12, static_cast<std::uint32_t>(pool_.in_use()));
  detail::put32(rec + 16, static_cast<std::uint32_t>(pool_.high_water()));
  detail::put32(rec + 20, static_cast<std::uint32_t>(pool_.capacity()));
  detail::put32(rec + 24, static_cast<std::uint32_t>(name_len));
  detail::put32(rec + 28, static_cast<std::uint32_t>(id_len));
  detail::put32(rec + 32, sessions);
  detail::put32(rec + 36, monitor_count_);
  for (std::size_t i = 0; i < wire::info_counter_count; ++i) detail::put64(rec + 40 + 8 * i, counters_[i]);
  std::memcpy(rec + wire::info_fixed_size, name, name_len);
  std::memcpy(rec + wire::info_fixed_size + name_len, protocol_.id, id_len);
  const std::size_t len = static_cast<std::size_t>(at - rec);
  wire::encode(wire::Header{wire::FrameType::Message, 0, 0, static_cast<std::uint32_t>(len)}, buf);
  // A fresh socket: its buffer is empty, so one datagram of this size goes.
  const Result r = detail::send_datagram(fd, buf, wire::header_size + len, -1);
  if (r != Result::Ok)
    LEMSG_LOG(Info, "service %s: info answer not sent: %s", log_name(), to_string(r));
}

inline void Service::attach_monitor(int fd, const Credentials& c, std::uint32_t payload) noexcept {
  std::size_t i = 0;
  while (i < LEMSG_MAX_MONITORS && monitors_[i].fd >= 0) ++i;
  if (i == LEMSG_MAX_MONITORS) {
    // A monitor that detached may not have been seen yet (its hang-up waits
    // in this same poll round): look before refusing.
    for (std::size_t j = 0; j < LEMSG_MAX_MONITORS; ++j) {
      struct pollfd p = {monitors_[j].fd, POLLIN, 0};
      if (::poll(&p, 1, 0) != 0) {
        drop_monitor(j, "detached", false);
        if (i == LEMSG_MAX_MONITORS) i = j;
      }
    }
  }
  if (i == LEMSG_MAX_MONITORS) {
    refuse(fd, c, Result::Busy);
    return;
  }
  MonitorSlot& m = monitors_[i];
  // A monitor sends nothing after its hello: anything readable (data or its
  // hang-up) detaches it.
  Result r = loop_.add_watch(fd, Readable, [this, i](int, short) { drop_monitor(i, "detached", false); }, m.watch);
  if (r == Result::Ok) r = detail::send_control(fd, wire::FrameType::Welcome, 0, 0, nullptr, 0);
  if (r != Result::Ok) {
    if (m.watch) {
      Result rr = loop_.remove_watch(m.watch);
      (void)rr;
      m.watch = WatchId{};
    }
    refuse(fd, c, r);
    return;
  }
  // Room for a monitor that falls behind for a moment: as many records as
  // the system lets a socket hold (the kernel caps the request at wmem_max).
  int big = 1 << 20;
  if (::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof big) != 0)
    LEMSG_LOG(Debug, "service %s: SO_SNDBUF for a monitor: %s", log_name(), std::strerror(errno));
  m.fd = fd;
  m.payload = payload < LEMSG_MONITOR_PAYLOAD ? payload : LEMSG_MONITOR_PAYLOAD;
  m.pid = c.pid;
  ++monitor_count_;
  LEMSG_LOG(Info, "service %s: monitor attached for pid %ld uid %ld (%lu attached)", log_name(),
            static_cast<long>(c.pid), static_cast<long>(c.uid), static_cast<unsigned long>(monitor_count_));
}

inline void Service::drop_monitor(std::size_t i, const char* why, bool dropped) noexcept {
  MonitorSlot& m = monitors_[i];
  if (m.fd < 0) return;
  if (m.watch) {
    Result r = loop_.remove_watch(m.watch);
    (void)r;
  }
  ::close(m.fd);
  LEMSG_LOG(Info, "service %s: monitor of pid %ld %s: %s", log_name(), static_cast<long>(m.pid),
            dropped ? "dropped" : "gone", why);
  m = MonitorSlot{};
  --monitor_count_;
  if (dropped) ++counters_[wire::CountMonitorsDropped];
}

inline void Service::monitor_block(bool out, std::uint32_t ref, const detail::MsgBlock* b) noexcept {
  monitor_frame(out, ref, b->header, detail::payload_of(const_cast<detail::MsgBlock*>(b)));
}

inline void Service::monitor_frame(bool out, std::uint32_t ref, const unsigned char* header,
                                   const unsigned char* payload) noexcept {
  unsigned char buf[wire::header_size + wire::record_fixed_size + LEMSG_MONITOR_PAYLOAD];
  unsigned char* rec = buf + wire::header_size;
  const std::uint32_t size = detail::get32(header + 8);
  std::uint32_t most = 0;
  for (const MonitorSlot& m : monitors_)
    if (m.fd >= 0 && m.payload > most) most = m.payload;
  if (most > size) most = size;
  detail::put64(rec, static_cast<std::uint64_t>(detail::now_ns()));
  detail::put32(rec + 8, ref);
  rec[12] = out ? 1 : 0;
  rec[13] = header[2];  // type
  rec[14] = header[3];  // flags
  rec[15] = 0;
  std::memcpy(rec + 16, header + 4, 4);  // txn
  detail::put32(rec + 20, size);
  if (most) std::memcpy(rec + wire::record_fixed_size, payload, most);
  for (std::size_t i = 0; i < LEMSG_MAX_MONITORS; ++i) {
    const MonitorSlot& m = monitors_[i];
    if (m.fd < 0) continue;
    const std::uint32_t n = m.payload < size ? m.payload : size;
    detail::put32(rec + 24, n);
    const std::uint32_t len = static_cast<std::uint32_t>(wire::record_fixed_size + n);
    wire::encode(wire::Header{wire::FrameType::Message, 0, 0, len}, buf);
    const Result r = detail::send_datagram(m.fd, buf, wire::header_size + len, -1);
    if (r == Result::WouldBlock) drop_monitor(i, "it does not read", true);
    else if (r != Result::Ok) drop_monitor(i, to_string(r), r != Result::Closed);
  }
}

inline Result Service::send_monitored(Peer& p, std::uint32_t ref, Message& m, wire::FrameType type,
                                      std::uint32_t txn, std::uint8_t flags) noexcept {
  Message seen = m;  // the frame, still readable after a send that releases `m`
  const Result r = p.ch.send(loop_, m, type, txn, flags);
  if (r == Result::Ok) monitor_block(true, ref, seen.blk_);
  return r;
}

// =============================================================================
// 11. Session                                                        >>session
// =============================================================================
//
// The client end: open (async; waits for a server that is not there yet),
// open_sync (with a timeout), try_open (once); send, request (async) and
// request_sync (with a timeout); reconnect with backoff.

/// Client side: why the server end went away (Closed, BadFrame, TooLarge, Overflow).
using SessionCloseHandler = Callable<void(Result reason)>;
/// Result of an open that was started with Session::open().
using OpenCallback = Callable<void(Result)>;
/// Completion of an async request: Ok with the response, or Closed, Timeout,
/// Unanswered or another error with an empty message.
/// Move-only: it may own a move-only object (a Responder, to relay).
using ResponseHandler = Callable<void(Result, Message&), LEMSG_CALLABLE_SIZE, false>;
namespace detail {

// The transaction ids of one Session's pending requests. An id is the
// pending slot's index in its low bits and a sequence number above them that
// wraps (after 2^(LEMSG_TXN_BITS - index bits) requests): a slot holds one
// request at a time, so a new id never equals a pending one, and the ids
// never run out. A late response to a slot's earlier request finds another
// id there and is refused, unless the sequence wrapped in between. 0 is
// never an id. Same interface as RefMap, so Session uses it the same way.
template <typename T, std::size_t N, unsigned Bits = LEMSG_TXN_BITS>
class TxnTable {
  static constexpr std::uint32_t index_bits = index_bits_for(N);
  static_assert(Bits <= 32 && Bits > index_bits, "LEMSG_TXN_BITS must leave room beside the pending slot index");
  static constexpr std::uint32_t seq_mask =
      Bits - index_bits >= 32 ? UINT32_MAX : ((std::uint32_t{1} << (Bits - index_bits)) - 1);
  static constexpr std::uint32_t index_mask = (std::uint32_t{1} << index_bits) - 1;

 public:
  // Ok with `txn` set, BadParameter for nullptr, NoMemory when all N are pending.
  Result add(T* obj, std::uint32_t& txn) noexcept {
    txn = 0;
    if (!obj) return Result::BadParameter;
    for (std::uint32_t i = 0; i < N; ++i) {
      if (e_[i].obj) continue;
      do {
        seq_ = (seq_ + 1) & seq_mask;
        txn = (seq_ << index_bits) | i;
      } while (txn == 0);
      e_[i].obj = obj;
      e_[i].txn = txn;
      ++count_;
      return Result::Ok;
    }
    return Result::NoMemory;
  }
  T* lookup(std::uint32_t txn) const noexcept {
    const std::uint32_t i = txn & index_mask;
    return (txn != 0 && i < N && e_[i].obj && e_[i].txn == txn) ? e_[i].obj : nullptr;
  }
  Result remove(std::uint32_t txn) noexcept {
    if (!lookup(txn)) return Result::NotFound;
    e_[txn & index_mask].obj = nullptr;
    --count_;
    return Result::Ok;
  }
  // f(T*, txn) for each pending id, in slot order.
  template <typename F>
  void for_each(F&& f) const {
    for (std::uint32_t i = 0; i < N; ++i)
      if (e_[i].obj) f(e_[i].obj, e_[i].txn);
  }
  std::size_t size() const noexcept { return count_; }

 private:
  struct Entry {
    T* obj = nullptr;
    std::uint32_t txn = 0;
  };
  Entry e_[N];
  std::size_t count_ = 0;
  std::uint32_t seq_ = 0;
};

}  // namespace detail

/// The client end of an interface. Owned by the caller, used on its Loop's
/// thread. At most LEMSG_MAX_PENDING requests wait at once.
/// A Unix socket from the server that is connected to this process (it
/// could keep the connection alive after the server dies) closes the session
/// with BadFrame; other Unix sockets are delivered, so keep only those from
/// a server you trust. A server that stops reading is not timed out here
/// (unlike on the Service side): give requests a timeout.
///
/// Lifetime: create it after its Loop and pool and destroy it before them
/// (their destructors stop the program otherwise). Any handler or callback
/// may destroy the Session or close it (le_msg_DeleteSession in a close
/// handler); the library touches nothing of it afterwards.
class Session {
 public:
  Session(Loop& loop, const Protocol& protocol, MessagePoolBase& pool) noexcept;
  /// Closes the session (pending requests complete with Closed). May run
  /// inside one of its own handlers, even one that close() is running.
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  /// Ok when constructed fine; BadParameter, TooBigForSocket, SystemError or
  /// TimerTableFull otherwise (as Service::status()).
  Result status() const noexcept { return status_; }

  /// Starts opening: connects now if the server is there, otherwise waits
  /// (inotify on the runtime dir, or on the directory above it while the
  /// runtime dir does not exist or after it was deleted; no polling) until it
  /// appears. `cb` runs on the loop, never inside open(), with Ok each time
  /// the session opens (again after a reconnect), or with ProtocolMismatch,
  /// SizeMismatch, NotPermitted, UnsafeRuntimeDir (another user owns or may
  /// write the runtime dir; see the transport section) or UntrustedServer
  /// (see require_server_uid), which end the attempt; close() before it runs
  /// drops it. Returns Ok (started), BadParameter, Busy (not closed), or
  /// Closed when a handler run to finish an earlier loss of the server (see
  /// request_sync) destroyed the Session.
  Result open(const char* name, OpenCallback cb) noexcept;
  /// Opens, waiting at most `timeout_ms` (> 0) for the server to appear and
  /// answer; blocks the thread (the loop does not run meanwhile). A server
  /// whose table is full is asked again (after 10 ms, doubling to 250 ms)
  /// until the timeout. Ok, Timeout, ProtocolMismatch, SizeMismatch,
  /// NotPermitted, UnsafeRuntimeDir, UntrustedServer, SessionTableFull or
  /// UidShareFull (still full at the timeout), WouldDeadlock (the server is
  /// served by this thread's loop), Busy, BadParameter, or Closed as for
  /// open() (the Session is gone).
  Result open_sync(const char* name, int timeout_ms) noexcept;
  /// One attempt: NotFound when no server listens; otherwise as open_sync
  /// with LEMSG_OPEN_TIMEOUT_MS for the server's answer (and for a full
  /// server to make room; Closed included).
  Result try_open(const char* name) noexcept;
  /// Opens only to a server running as `uid` (from SO_PEERCRED, checked
  /// before anything is sent to it): a server of another user, for instance
  /// an impostor's socket, makes the open end with UntrustedServer. Use it
  /// for a service that runs as root or as a known system user. uid_t(-1),
  /// the default, accepts any server. Applies from the next open.
  void require_server_uid(uid_t uid) noexcept { required_uid_ = uid; }
  /// Direct (the socket file <runtime dir>/<name>) or through the service
  /// directory, where `name` is this client's name for the interface and
  /// its binding decides the server; Auto, the default, reads
  /// LEMSG_DIRECTORY at each open (see Discovery and section 13). In
  /// directory mode open and open_sync wait in the directory for a binding
  /// and a server (and for the directory itself while it is not running);
  /// try_open gives NotPermitted when this uid has no binding for `name`
  /// and NotFound when the bound server (or the directory) is not there;
  /// require_server_uid and server_credentials use the server's identity as
  /// the directory saw it. Applies from the next open.
  void set_discovery(Discovery d) noexcept { discovery_ = d; }
  /// Closes (or stops opening). Pending requests complete with Closed before
  /// this returns; the close handler is not called (it is for the server's
  /// side going away), also when close() runs inside a handler while the
  /// server's side goes away. Reconnecting stops until the next open, also
  /// when close() is called from the close handler.
  void close() noexcept;
  bool is_open() const noexcept { return state_ == State::Open; }

  void set_receive_handler(ReceiveHandler h) noexcept { receive_handler_ = std::move(h); }
  void set_close_handler(SessionCloseHandler h) noexcept { close_handler_ = std::move(h); }
  /// After the server side goes away, open again by itself: first after
  /// `min_ms`, doubling up to `max_ms` while attempts fail, then waiting for
  /// the socket to reappear. Off by default.
  void set_reconnect(bool on, std::uint32_t min_ms = 50, std::uint32_t max_ms = 2000) noexcept;

  /// A message from this session's pool. Ok or PoolEmpty.
  Result create_message(Message& out) noexcept { return status_ != Result::Ok ? status_ : pool_.create(out); }
  /// One-way send. Ok (consumed); Closed (not open); BadParameter; TooLarge;
  /// TooBigForSocket; Overflow. On failure the message is still the caller's.
  Result send(Message&& m) noexcept;
  /// Sends a request; `done` runs exactly once on the loop: Ok with the
  /// response, Closed, Timeout (after `timeout_ms`, 0 = none) or Unanswered.
  /// Returns Ok (sent or queued; consumed), Closed, BadParameter, TooLarge,
  /// TooBigForSocket, Overflow or PendingTableFull (then `done` is not called and the message
  /// is still the caller's).
  Result request(Message&& m, ResponseHandler done, std::uint32_t timeout_ms = 0) noexcept;
  /// Sends a request and blocks until its response, at most `timeout_ms`
  /// (> 0). Frames for other purposes that arrive meanwhile are delivered, in
  /// order, from the loop after this returns. Ok with `response` set;
  /// Timeout (a late response is discarded); Closed; Unanswered;
  /// WouldDeadlock (only this thread's loop could answer); PoolEmpty;
  /// Overflow; and the errors of request().
  Result request_sync(Message&& m, Message& response, int timeout_ms) noexcept;

  std::size_t pending_count() const noexcept { return pending_refs_.size(); }
  /// The server's uid, gid and pid. Ok, or Closed when not open.
  Result server_credentials(Credentials& out) const noexcept;
  Loop& loop() noexcept { return loop_; }

 private:
  // Asking: directory mode, waiting for the directory to hand us over.
  enum class State : std::uint8_t { Idle, Waiting, Asking, Handshake, Open, Backoff };
  struct Pending {
    ResponseHandler done;
    std::int64_t deadline = 0;  // 0 = none
    bool used = false;
  };

  // Functions returning bool call user code: false means the Session was
  // destroyed meanwhile, and the caller returns without touching it.
  Result prepare(const char* name) noexcept;
  Result connect_checked(int& fd) noexcept;
  // Directory mode: asks the directory for the interface and blocks for its
  // answer until dir_deadline_ (waiting in it when dir_wait_). Ok with `fd`
  // now the server's and server_ set; Timeout; NotFound (no directory, or
  // the server is not registered and we do not wait); NotPermitted (not
  // bound); UntrustedServer; WaitTableFull; BadFrame; as connect_checked.
  Result ask_directory(int& fd) noexcept;
  // The directory's answer, on the loop (state Asking).
  void on_directory_answer() noexcept;
  // The server the directory names: as require_server_uid asks?
  Result check_named_server(const detail::dirwire::Record& a) noexcept;
  void attempt() noexcept;
  bool watch_dir() noexcept;
  void stop_watching_dir() noexcept;
  void on_dir_event() noexcept;
  Result send_hello(int fd) const noexcept;
  Result start_handshake(int fd) noexcept;
  Result handshake_blocking(int fd, std::int64_t deadline) noexcept;
  static bool wait_for_room(Result refused, std::int64_t deadline, std::uint32_t& pause_ms) noexcept;
  Result finish_open(int fd) noexcept;
  void on_socket(short revents) noexcept;
  void on_handshake_frame() noexcept;
  bool dispatch_frame(Message& m) noexcept;
  bool deliver_deferred() noexcept;
  void on_timer() noexcept;
  void reschedule() noexcept;
  bool lose_server(Result reason) noexcept;
  void fail_open(Result why) noexcept;
  void backoff() noexcept;
  // The one way a pending request completes (response, error, Closed,
  // Timeout): exactly once, with `response` or an empty message (nullptr).
  // False when the handler destroyed the Session.
  bool complete(std::uint32_t txn, Result why, Message* response) noexcept;
  bool complete_all(Result why) noexcept;
  Result check_outgoing(const Message& m) const noexcept;
  // What the client accepts once open (a Message, or a Response whose error
  // code is known); marks the message's kind. Ok or BadFrame.
  Result check_incoming(const wire::Header& h, Message& m) const noexcept;
  // A free pending slot and its id (Ok or PendingTableFull), and back.
  Result add_pending(std::uint32_t& txn, Pending*& slot) noexcept;
  void drop_pending(std::uint32_t txn) noexcept;
  // request_sync's wait, at most `left` ms: Ok when a frame may be read
  // (`wait`: read it blocking, inside recvmsg), WouldBlock to look again,
  // Timeout, SystemError.
  Result wait_readable(int left, bool& wait) noexcept;
  // The server is lost inside request_sync: the close handler and the other
  // completions run from the loop after it returns, not inside it.
  void lose_later(Result why) noexcept;
  // A typed client found the server's frame malformed: the session ends
  // with `why`, from the loop (as lose_later), when it is still open.
  void drop_server(Result why) noexcept {
    if (state_ != State::Open) return;
    LEMSG_LOG(Warning, "session %s: server sent a bad frame: %s", name_, to_string(why));
    lose_later(why);
    reschedule();
  }
  friend struct detail::TypedAccess;
  // Typed clients: runs after every open (sync or not, reconnects too),
  // before the open callback, to send the event subscriptions again.
  void (*opened_hook_)(void*) noexcept = nullptr;
  void* opened_ctx_ = nullptr;

  Loop& loop_;
  Protocol protocol_;
  MessagePoolBase& pool_;
  Result status_ = Result::Ok;
  State state_ = State::Idle;
  detail::Channel ch_;
  TimerId timer_;
  int dir_fd_ = -1;  // inotify
  int dir_parent_wd_ = -1;  // its watch on the runtime dir's parent, while the dir is missing
  WatchId dir_watch_;
  uid_t required_uid_ = static_cast<uid_t>(-1);
  Discovery discovery_ = Discovery::Auto;
  bool via_dir_ = false;             // this open goes through the directory; path_ is its socket
  bool dir_wait_ = false;            // ask_directory: wait in the directory
  std::int64_t dir_deadline_ = 0;    // ask_directory: until then
  char iface_[LEMSG_MAX_NAME + 1] = {};  // directory mode: the interface asked for
  char path_[sizeof(sockaddr_un::sun_path)] = {};
  const char* name_ = nullptr;  // points into path_
  OpenCallback open_cb_;
  ReceiveHandler receive_handler_;
  SessionCloseHandler close_handler_;
  Credentials server_;
  int sndbuf_ = 0;  // SO_SNDBUF the socket needs (0: the default)
  bool server_here_ = false;  // the server was this process at open (saves a getpid per request_sync)
  bool reconnect_ = false;
  std::uint32_t backoff_min_ = 50;
  std::uint32_t backoff_max_ = 2000;
  std::uint32_t backoff_next_ = 50;
  std::int64_t handshake_deadline_ = 0;
  std::int64_t backoff_deadline_ = 0;
  bool lost_pending_ = false;  // server lost inside request_sync; finish on the loop
  Result lost_reason_ = Result::Closed;
  Result open_failed_ = Result::Ok;  // an open that failed, reported from the loop
  std::uint32_t close_count_ = 0;    // close() calls, so a loss sees one made by a handler
  Pending pending_[LEMSG_MAX_PENDING];
  detail::TxnTable<Pending, LEMSG_MAX_PENDING> pending_refs_;
  Message deferred_[LEMSG_MAX_DEFERRED];
  std::size_t deferred_head_ = 0;
  std::size_t deferred_count_ = 0;
  detail::Lifeline life_;
};

// -- implementation --

inline Session::Session(Loop& loop, const Protocol& protocol, MessagePoolBase& pool) noexcept
    : loop_(loop), protocol_(protocol), pool_(pool) {
  ++loop_.users_;
  ++pool_.users_;
  status_ = detail::check_protocol("session", protocol, pool);
  if (status_ != Result::Ok) return;
  status_ = detail::probe_datagram(wire::header_size + protocol.max_payload, sndbuf_);
  if (status_ != Result::Ok) {
    LEMSG_LOG(Error, "session %s: frames of %lu bytes cannot travel: %s", protocol.id,
              static_cast<unsigned long>(wire::header_size + protocol.max_payload), to_string(status_));
    return;
  }
  status_ = loop_.add_timer([this] { on_timer(); }, timer_);
}

inline Session::~Session() {
  close();
  if (timer_) {
    Result r = loop_.remove_timer(timer_);
    (void)r;
  }
  --pool_.users_;
  --loop_.users_;
}

inline void Session::set_reconnect(bool on, std::uint32_t min_ms, std::uint32_t max_ms) noexcept {
  reconnect_ = on;
  backoff_min_ = min_ms ? min_ms : 1;
  backoff_max_ = max_ms < backoff_min_ ? backoff_min_ : max_ms;
  backoff_next_ = backoff_min_;
}

inline Result Session::prepare(const char* name) noexcept {
  if (status_ != Result::Ok) return status_;
  if (lost_pending_) {
    // The server went away inside request_sync and the loop has not run
    // since: finish that close now, before opening again.
    lost_pending_ = false;
    if (!deliver_deferred() || !complete_all(Result::Closed)) return Result::Closed;
    if (close_handler_) {
      SessionCloseHandler h = close_handler_;
      if (!life_.call([&] { h(lost_reason_); })) return Result::Closed;
    }
  }
  if (state_ != State::Idle) return Result::Busy;
  open_failed_ = Result::Ok;  // the report of an earlier attempt goes with it
  via_dir_ = detail::directory_mode(discovery_, path_);
  if (via_dir_) {
    if (!detail::valid_name(name) || !path_[0]) return Result::BadParameter;
    detail::dirwire::set_text(iface_, sizeof iface_, name);
    name_ = iface_;
    return Result::Ok;
  }
  Result r = detail::socket_path(name, path_);
  if (r != Result::Ok) return r;
  name_ = std::strrchr(path_, '/') + 1;
  return Result::Ok;
}

inline Result Session::open(const char* name, OpenCallback cb) noexcept {
  Result r = prepare(name);
  if (r != Result::Ok) return r;
  open_cb_ = std::move(cb);
  backoff_next_ = backoff_min_;
  attempt();
  return Result::Ok;
}

inline bool Session::watch_dir() noexcept {
  if (dir_fd_ >= 0) return true;
  const int fd = ::inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  if (fd < 0) return false;
  dir_parent_wd_ = -1;
  if (!detail::watch_socket_dir(fd, path_, dir_parent_wd_) ||
      loop_.add_watch(fd, Readable, [this](int, short) { on_dir_event(); }, dir_watch_) != Result::Ok) {
    ::close(fd);
    return false;
  }
  dir_fd_ = fd;
  return true;
}

inline void Session::stop_watching_dir() noexcept {
  if (dir_fd_ < 0) return;
  Result r = loop_.remove_watch(dir_watch_);
  (void)r;
  dir_watch_ = WatchId{};
  ::close(dir_fd_);
  dir_fd_ = -1;
  dir_parent_wd_ = -1;
}

inline void Session::on_dir_event() noexcept {
  alignas(struct inotify_event) char buf[1024];
  bool ours = false, moved = false;
  for (;;) {
    const ssize_t n = ::read(dir_fd_, buf, sizeof buf);
    if (n <= 0) break;
    for (ssize_t off = 0; off + static_cast<ssize_t>(sizeof(struct inotify_event)) <= n;) {
      const struct inotify_event* ev = reinterpret_cast<const struct inotify_event*>(buf + off);
      // Made in the parent: maybe the dir. A queue overflow (wd -1) may hide anything.
      if (ev->wd == dir_parent_wd_ || (ev->mask & IN_Q_OVERFLOW)) moved = true;
      else if (ev->len && std::strcmp(ev->name, std::strrchr(path_, '/') + 1) == 0) ours = true;  // the socket's file
      if (ev->mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF)) moved = true;  // the directory went away
      off += static_cast<ssize_t>(sizeof(struct inotify_event) + ev->len);
    }
  }
  if (state_ != State::Waiting || !(ours || moved)) return;
  // Watch the directory now there (or its parent while it is missing) before
  // connecting, so a server appearing in between is not missed.
  if (moved && !detail::watch_socket_dir(dir_fd_, path_, dir_parent_wd_)) stop_watching_dir();
  attempt();
}

inline Result Session::check_named_server(const detail::dirwire::Record& a) noexcept {
  server_.pid = static_cast<pid_t>(a.b);
  server_.uid = static_cast<uid_t>(a.c);
  server_.gid = static_cast<gid_t>(a.d);
  if (required_uid_ == static_cast<uid_t>(-1) || server_.uid == required_uid_) return Result::Ok;
  LEMSG_LOG(Warning, "session %s: the directory's server runs as uid %u, not the required %u: refused", name_,
            static_cast<unsigned>(server_.uid), static_cast<unsigned>(required_uid_));
  return Result::UntrustedServer;
}

inline Result Session::ask_directory(int& fd) noexcept {
  namespace dw = detail::dirwire;
  fd = -1;
  dw::Record req;
  req.op = dw::Open;
  req.flags = dir_wait_ ? dw::FlagWait : 0;
  dw::set_text(req.name, sizeof req.name, iface_);
  detail::SocketWaiter waiter;
  bool watched = false;
  for (;;) {
    int s = -1;
    Result r = dw::ask(path_, req, s);
    bool soon = r == Result::Busy;
    // The hello goes at once, behind the question: the directory reads only
    // the question, and the socket takes the hello to the server, which
    // saves the server a round trip after the hand-over.
    // When it fails, the directory has answered already (and closed): read
    // that answer below.
    if (r == Result::Ok) (void)send_hello(s);
    if (r == Result::Ok) {
      dw::Record a;
      r = dw::wait(s, a, dir_deadline_);
      if (r == Result::Ok) r = a.op == dw::Answer ? dw::answer_code(a.a) : Result::BadFrame;
      if (r == Result::Ok) r = check_named_server(a);
      if (r == Result::Ok) {
        fd = s;
        return r;
      }
      ::close(s);
      if (r != Result::Closed) return r;
      soon = true;  // the directory went away: it may be back at once
      LEMSG_LOG(Info, "session %s: the directory went away; asking again", name_);
    } else if (r != Result::NotFound && r != Result::Busy) {
      return r;
    }
    if (!dir_wait_ && r != Result::Busy) return Result::NotFound;
    if (detail::ms_until(dir_deadline_) == 0) return Result::Timeout;
    if (!watched) {
      watched = true;
      const bool armed = waiter.start(path_);
      if (r == Result::NotFound)
        LEMSG_LOG(Info, "session %s: no directory at %s yet; waiting (%s)", name_, path_,
                  armed ? "inotify" : "checking every 20 ms");
      continue;
    }
    waiter.wait(path_, detail::ms_until(dir_deadline_), soon);
  }
}

inline Result Session::connect_checked(int& fd) noexcept {
  fd = -1;
  if (via_dir_) return ask_directory(fd);
  Result r = detail::check_socket_dir(path_);
  if (r == Result::Ok) r = detail::connect_to(path_, fd);
  if (r != Result::Ok || required_uid_ == static_cast<uid_t>(-1)) return r;
  Credentials c;
  r = detail::peer_credentials(fd, c);
  if (r == Result::Ok && c.uid != required_uid_) {
    LEMSG_LOG(Warning, "session %s: the server runs as uid %u, not the required %u: refused", name_,
              static_cast<unsigned>(c.uid), static_cast<unsigned>(required_uid_));
    r = Result::UntrustedServer;
  }
  if (r != Result::Ok) {
    ::close(fd);
    fd = -1;
  }
  return r;
}

inline void Session::attempt() noexcept {
  int fd = -1;
  Result r;
  if (via_dir_) {
    // Connect and ask; the answer comes on the loop (on_directory_answer).
    detail::dirwire::Record req;
    req.op = detail::dirwire::Open;
    req.flags = detail::dirwire::FlagWait;
    detail::dirwire::set_text(req.name, sizeof req.name, iface_);
    r = detail::dirwire::ask(path_, req, fd);
    if (r == Result::NotFound) {
      const bool was_watching = dir_fd_ >= 0;
      if (watch_dir() && !was_watching) r = detail::dirwire::ask(path_, req, fd);
    }
    if (r == Result::Ok) (void)send_hello(fd);  // as in ask_directory: the hello travels with the socket
    if (r == Result::Ok) {
      stop_watching_dir();
      r = loop_.add_watch(fd, Readable, [this](int, short ev) { on_socket(ev); }, ch_.watch);
      if (r != Result::Ok) {
        ::close(fd);
        backoff();
        return;
      }
      ch_.fd = fd;
      state_ = State::Asking;
      LEMSG_LOG(Debug, "session %s: asked the directory %s", name_, path_);
      reschedule();
      return;
    }
    if (r == Result::NotFound && dir_fd_ >= 0) {
      if (state_ != State::Waiting) LEMSG_LOG(Info, "session %s: no directory at %s yet; waiting for it (inotify)", name_, path_);
      state_ = State::Waiting;
      reschedule();
      return;
    }
    if (r == Result::NotPermitted || r == Result::UnsafeRuntimeDir) fail_open(r);
    else backoff();
    return;
  }
  r = connect_checked(fd);
  bool watching = false;
  if (r == Result::NotFound) {
    // Watch only once the server is missing (closing an inotify watch costs
    // milliseconds), then connect again, so a server that appeared in
    // between is not missed.
    const bool was_watching = dir_fd_ >= 0;
    watching = watch_dir();
    if (watching && !was_watching) r = connect_checked(fd);
  }
  if (r == Result::Ok) {
    stop_watching_dir();
    const Result h = start_handshake(fd);
    if (h != Result::Ok) backoff();
    return;
  }
  if (r == Result::NotFound && watching) {
    if (state_ != State::Waiting) LEMSG_LOG(Info, "session %s: no server at %s yet; waiting for it (inotify)", name_, path_);
    state_ = State::Waiting;
    reschedule();
    return;
  }
  if (r == Result::NotPermitted || r == Result::UnsafeRuntimeDir || r == Result::UntrustedServer) {
    fail_open(r);
    return;
  }
  // No inotify (neither the runtime dir nor its parent exists), a full backlog, or an error:
  // try again after a bounded backoff.
  backoff();
}

inline void Session::backoff() noexcept {
  stop_watching_dir();
  state_ = State::Backoff;
  LEMSG_LOG(Debug, "session %s: next attempt at %s in %lu ms", name_, path_, static_cast<unsigned long>(backoff_next_));
  backoff_deadline_ = detail::now_ns() + static_cast<std::int64_t>(backoff_next_) * 1000000;
  backoff_next_ = backoff_next_ * 2 > backoff_max_ ? backoff_max_ : backoff_next_ * 2;
  reschedule();
}

inline void Session::fail_open(Result why) noexcept {
  stop_watching_dir();
  ch_.reset(loop_);
  state_ = State::Idle;
  LEMSG_LOG(Warning, "session %s: open failed: %s", name_, to_string(why));
  // Reported from the loop (the timer, at once), never inside open().
  open_failed_ = why;
  reschedule();
}

inline Result Session::send_hello(int fd) const noexcept {
  unsigned char hello[8 + LEMSG_MAX_PROTOCOL_ID];
  const std::uint32_t idlen = static_cast<std::uint32_t>(std::strlen(protocol_.id));
  std::memcpy(hello, &protocol_.max_payload, 4);
  std::memcpy(hello + 4, &idlen, 4);
  std::memcpy(hello + 8, protocol_.id, idlen);
  return detail::send_control(fd, wire::FrameType::Hello, 0, 0, hello, 8 + idlen);
}

inline Result Session::start_handshake(int fd) noexcept {
  Result r = send_hello(fd);
  // A server that refuses us (allow-list, full table) answers and closes at
  // accept, so the hello may meet a closed socket: read the answer anyway.
  if (r == Result::Closed) r = Result::Ok;
  if (r == Result::Ok) r = detail::peer_credentials(fd, server_);
  server_here_ = r == Result::Ok && server_.pid == ::getpid();
  if (r == Result::Ok) r = loop_.add_watch(fd, Readable, [this](int, short ev) { on_socket(ev); }, ch_.watch);
  if (r != Result::Ok) {
    ::close(fd);
    return r;
  }
  ch_.fd = fd;
  detail::set_send_buffer(fd, sndbuf_);
  ch_.blocking = detail::clear_nonblock(fd);
  state_ = State::Handshake;
  handshake_deadline_ = detail::now_ns() + static_cast<std::int64_t>(LEMSG_OPEN_TIMEOUT_MS) * 1000000;
  reschedule();
  return Result::Ok;
}

inline void Session::on_handshake_frame() noexcept {
  Result answer = Result::BadFrame;
  const Result r = detail::read_answer(ch_.fd, answer);
  if (r == Result::WouldBlock) return;
  if (r == Result::Closed) {
    // The server went away between accept and answer (or it was a stale
    // listener); look for it again.
    ch_.reset(loop_);
    backoff();
    return;
  }
  if (r == Result::Ok && answer == Result::Ok) {
    LEMSG_LOG(Info, "session %s: open (server pid %ld uid %ld)", name_, static_cast<long>(server_.pid),
              static_cast<long>(server_.uid));
    state_ = State::Open;
    backoff_next_ = backoff_min_;
    reschedule();
    if (opened_hook_) opened_hook_(opened_ctx_);
    if (open_cb_) {
      OpenCallback cb = open_cb_;
      // The last thing done here, so whether the Session survives is moot.
      (void)life_.call([&] { cb(Result::Ok); });
    }
    return;
  }
  const Result why = r == Result::Ok ? answer : Result::BadFrame;
  if ((why == Result::SessionTableFull || why == Result::UidShareFull) && reconnect_) {
    ch_.reset(loop_);
    backoff();
    return;
  }
  fail_open(why);
}

inline Result Session::handshake_blocking(int fd, std::int64_t deadline) noexcept {
  // Through the directory the hello went right after the question (it waits
  // in the socket for the server).
  Result r = via_dir_ ? Result::Ok : send_hello(fd);
  // Closed: the server may have refused us at accept; its answer is queued.
  if (r != Result::Ok && r != Result::Closed) return r;
  struct pollfd pfd = {fd, POLLIN, 0};
  for (;;) {
    const int rc = ::poll(&pfd, 1, detail::ms_until(deadline));
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) return Result::SystemError;
    if (rc == 0) return Result::Timeout;
    Result answer = Result::BadFrame;
    r = detail::read_answer(fd, answer);
    if (r == Result::WouldBlock) continue;
    return r == Result::Ok ? answer : r;
  }
}

// A server whose table is full now may have room soon (a session closes):
// true, after a pause of `pause_ms` (10 ms doubling to 250 ms, never past
// `deadline`), when the caller should connect again.
inline bool Session::wait_for_room(Result refused, std::int64_t deadline, std::uint32_t& pause_ms) noexcept {
  if (refused != Result::SessionTableFull && refused != Result::UidShareFull) return false;
  const int left = detail::ms_until(deadline);
  if (left <= 0) return false;
  const int wait = static_cast<int>(pause_ms) < left ? static_cast<int>(pause_ms) : left;
  const std::int64_t until = detail::now_ns() + static_cast<std::int64_t>(wait) * 1000000;
  while (::poll(nullptr, 0, detail::ms_until(until)) < 0 && errno == EINTR) {
  }
  pause_ms = pause_ms * 2 > 250 ? 250 : pause_ms * 2;
  return true;
}

inline Result Session::finish_open(int fd) noexcept {
  // Through the directory, SO_PEERCRED would name the directory: server_ has
  // what the directory told us.
  Result r = via_dir_ ? Result::Ok : detail::peer_credentials(fd, server_);
  server_here_ = r == Result::Ok && server_.pid == ::getpid();
  if (r == Result::Ok) r = loop_.add_watch(fd, Readable, [this](int, short ev) { on_socket(ev); }, ch_.watch);
  if (r != Result::Ok) {
    ::close(fd);
    return r;
  }
  ch_.fd = fd;
  detail::set_send_buffer(fd, sndbuf_);
  ch_.blocking = detail::clear_nonblock(fd);
  state_ = State::Open;
  backoff_next_ = backoff_min_;
  if (opened_hook_) opened_hook_(opened_ctx_);
  return Result::Ok;
}

inline Result Session::open_sync(const char* name, int timeout_ms) noexcept {
  if (timeout_ms <= 0) return Result::BadParameter;
  Result r = prepare(name);
  if (r != Result::Ok) return r;
  if (detail::served_by_this_thread(path_)) return Result::WouldDeadlock;
  const std::int64_t deadline = detail::now_ns() + static_cast<std::int64_t>(timeout_ms) * 1000000;
  dir_wait_ = true;  // directory mode: connect_checked waits in the directory until the deadline
  dir_deadline_ = deadline;
  detail::SocketWaiter waiter;
  bool watched = false;
  std::uint32_t pause_ms = 10;
  Result refused = Result::Ok;  // the last full-table refusal, if any
  for (;;) {
    int fd = -1;
    r = connect_checked(fd);
    if (r == Result::Ok) {
      r = handshake_blocking(fd, deadline);
      if (r == Result::Ok) {
        r = finish_open(fd);
        break;
      }
      ::close(fd);
      if (wait_for_room(r, deadline, pause_ms)) {  // full: try again until the deadline
        refused = r;
        continue;
      }
      if (r != Result::Closed) break;  // Closed: the server went away meanwhile; wait for it again
      if (via_dir_) continue;          // the directory holds us until it is back
    } else if (r != Result::NotFound && r != Result::Busy) {
      break;
    }
    if (detail::ms_until(deadline) == 0) {
      r = Result::Timeout;
      break;
    }
    if (!watched) {
      // Watch only once the server is missing: closing an inotify watch costs
      // milliseconds (the kernel synchronises), far more than a whole open.
      // Connect again after the watch is set, so an appearance is not missed.
      watched = true;
      const bool armed = waiter.start(path_);
      LEMSG_LOG(Info, "session %s: no server at %s yet; waiting up to %d ms (%s)", name_, path_, timeout_ms,
                armed ? "inotify" : "checking every 20 ms");
      continue;
    }
    // A full backlog (Busy) is asked again soon, whatever the directory does.
    waiter.wait(path_, detail::ms_until(deadline), r == Result::Busy);
  }
  // Out of time while asking a full server again: say why it was refused.
  if (r == Result::Timeout && refused != Result::Ok) r = refused;
  if (r == Result::Ok)
    LEMSG_LOG(Info, "session %s: open (server pid %ld uid %ld)", name_, static_cast<long>(server_.pid),
              static_cast<long>(server_.uid));
  else if (r != Result::Closed)
    LEMSG_LOG(Info, "session %s: open_sync after %d ms: %s", name_, timeout_ms, to_string(r));
  return r;
}

inline Result Session::try_open(const char* name) noexcept {
  Result r = prepare(name);
  if (r != Result::Ok) return r;
  if (detail::served_by_this_thread(path_)) return Result::WouldDeadlock;
  const std::int64_t deadline = detail::now_ns() + static_cast<std::int64_t>(LEMSG_OPEN_TIMEOUT_MS) * 1000000;
  dir_wait_ = false;  // directory mode: one question, no waiting
  dir_deadline_ = deadline;
  std::uint32_t pause_ms = 10;
  Result refused = Result::Ok;
  for (;;) {
    int fd = -1;
    r = connect_checked(fd);
    if (r != Result::Ok) return r;
    r = handshake_blocking(fd, deadline);
    if (r == Result::Ok) return finish_open(fd);
    ::close(fd);
    if (wait_for_room(r, deadline, pause_ms)) {
      refused = r;
      continue;
    }
    if (r == Result::Timeout && refused != Result::Ok) return refused;
    return r == Result::Closed ? Result::NotFound : r;
  }
}

inline bool Session::complete(std::uint32_t txn, Result why, Message* response) noexcept {
  Pending* p = pending_refs_.lookup(txn);
  if (!p) return true;
  ResponseHandler done = std::move(p->done);
  const bool had_deadline = p->deadline != 0;
  p->used = false;
  Result r = pending_refs_.remove(txn);
  (void)r;
  if (had_deadline) reschedule();  // before the handler, which may destroy the Session
  if (!done) return true;
  Message none;
  Message& m = response ? *response : none;
  return life_.call([&] { done(why, m); });
}

inline bool Session::complete_all(Result why) noexcept {
  std::uint32_t refs[LEMSG_MAX_PENDING];
  std::size_t n = 0;
  pending_refs_.for_each([&](Pending*, std::uint32_t ref) { refs[n++] = ref; });
  // A handler may complete the rest itself (close(), or the destructor, run
  // inside it): complete() skips an id no longer pending.
  for (std::size_t i = 0; i < n; ++i)
    if (!complete(refs[i], why, nullptr)) return false;
  return true;
}

inline void Session::close() noexcept {
  if (state_ != State::Idle) LEMSG_LOG(Info, "session %s: closed by this side", name_);
  stop_watching_dir();
  ch_.reset(loop_);
  state_ = State::Idle;
  lost_pending_ = false;
  open_failed_ = Result::Ok;
  ++close_count_;
  for (std::size_t i = 0; i < deferred_count_; ++i) deferred_[(deferred_head_ + i) % LEMSG_MAX_DEFERRED].release();
  deferred_head_ = deferred_count_ = 0;
  if (!complete_all(Result::Closed)) return;
  if (state_ == State::Idle) reschedule();
}

inline bool Session::lose_server(Result reason) noexcept {
  LEMSG_LOG(Info, "session %s: closed from the server's side: %s", name_, to_string(reason));
  ch_.reset(loop_);
  state_ = State::Idle;
  // A close() from any handler below ends the session for good: no close
  // handler after it, and no reconnecting.
  const std::uint32_t closes = close_count_;
  // What arrived before the end is delivered before anyone hears of the end.
  if (!deliver_deferred() || !complete_all(Result::Closed)) return false;
  if (state_ == State::Idle && closes == close_count_ && close_handler_) {
    SessionCloseHandler h = close_handler_;
    if (!life_.call([&] { h(reason); })) return false;
  }
  if (state_ == State::Idle && closes == close_count_ && reconnect_) backoff();
  else reschedule();
  return true;
}

inline void Session::on_directory_answer() noexcept {
  namespace dw = detail::dirwire;
  dw::Record a;
  int got = -1;
  Result r = dw::recv(ch_.fd, a, got);
  if (r == Result::WouldBlock) return;
  if (got >= 0) {
    ::close(got);
    r = Result::BadFrame;
  }
  if (r != Result::Ok) {
    // The directory went away (or misbehaved): ask again, waiting for it.
    LEMSG_LOG(Info, "session %s: lost the directory while waiting (%s); asking again", name_, to_string(r));
    ch_.reset(loop_);
    state_ = State::Idle;
    attempt();
    return;
  }
  r = a.op == dw::Answer ? dw::answer_code(a.a) : Result::BadFrame;
  if (r == Result::Ok) r = check_named_server(a);
  if (r == Result::Ok) {
    // The socket is the server's now, the hello in it already.
    server_here_ = server_.pid == ::getpid();
    detail::set_send_buffer(ch_.fd, sndbuf_);
    ch_.blocking = detail::clear_nonblock(ch_.fd);
    state_ = State::Handshake;
    handshake_deadline_ = detail::now_ns() + static_cast<std::int64_t>(LEMSG_OPEN_TIMEOUT_MS) * 1000000;
    reschedule();
    return;
  }
  ch_.reset(loop_);
  if (r == Result::WaitTableFull || r == Result::BadFrame) {
    LEMSG_LOG(Warning, "session %s: the directory answered %s; asking again later", name_, to_string(r));
    backoff();
    return;
  }
  fail_open(r);
}

inline void Session::on_socket(short revents) noexcept {
  if (state_ == State::Asking) {
    on_directory_answer();
    return;
  }
  if (state_ == State::Handshake) {
    on_handshake_frame();
    return;
  }
  if (state_ != State::Open) return;
  if (revents & POLLOUT) {
    if (ch_.flush(loop_) != Result::Ok) {
      (void)lose_server(Result::Closed);
      return;
    }
  }
  if (!(revents & (POLLIN | POLLHUP | POLLERR))) return;
  ch_.readable();
  for (int i = 0; (i < 16 || ch_.has_held()) && state_ == State::Open; ++i) {
    // Arrival order: frames of the batch in hand, then what a request_sync
    // made in a handler set aside, then the socket.
    if (!ch_.has_held() && deferred_count_) {
      if (!deliver_deferred() || state_ != State::Open) return;
    }
    Message m;
    wire::Header h;
    Result r = ch_.next(pool_, protocol_.max_payload, m, h);
    if (r == Result::WouldBlock) return;
    if (r == Result::PoolEmpty) {
      ch_.starved = true;
      ch_.update_events(loop_);
      if ((revents & POLLHUP) && !(revents & POLLIN)) (void)lose_server(Result::Closed);
      else reschedule();
      return;
    }
    if (r == Result::Ok) r = check_incoming(h, m);
    if (r != Result::Ok) {
      if (r != Result::Closed) LEMSG_LOG(Warning, "session %s: server sent a bad frame: %s", name_, to_string(r));
      (void)lose_server(r);
      return;
    }
    if (!dispatch_frame(m)) return;
  }
}

inline bool Session::dispatch_frame(Message& m) noexcept {
  if (m.blk_->kind == detail::MsgKind::Received) {
    if (receive_handler_) {
      ReceiveHandler h = receive_handler_;
      return life_.call([&] { h(m); });
    }
    return true;
  }
  const std::uint32_t txn = m.blk_->txn;
  if (!pending_refs_.lookup(txn)) {
    // Its request timed out or was closed: a late answer, discarded.
    LEMSG_LOG(Debug, "session %s: response to no pending request; discarded", name_);
    return true;
  }
  // An error response completes with the Result it carries and no message.
  const Result status = m.status();
  return complete(txn, status, status == Result::Ok ? &m : nullptr);
}

inline bool Session::deliver_deferred() noexcept {
  while (deferred_count_) {
    Message m = std::move(deferred_[deferred_head_]);
    deferred_head_ = (deferred_head_ + 1) % LEMSG_MAX_DEFERRED;
    --deferred_count_;
    if (!dispatch_frame(m)) return false;
  }
  return true;
}

inline Result Session::check_outgoing(const Message& m) const noexcept {
  if (state_ != State::Open) return Result::Closed;
  if (!m || m.blk_->kind != detail::MsgKind::Outgoing || m.is_shared())
    return Result::BadParameter;
  if (m.size() > protocol_.max_payload) return Result::TooLarge;
  return Result::Ok;
}

inline Result Session::send(Message&& m) noexcept {
  Result r = check_outgoing(m);
  if (r != Result::Ok) return r;
  return ch_.send(loop_, m, wire::FrameType::Message, 0, 0);
}

inline Result Session::request(Message&& m, ResponseHandler done, std::uint32_t timeout_ms) noexcept {
  Result r = check_outgoing(m);
  if (r != Result::Ok) return r;
  if (!done) return Result::BadParameter;
  std::uint32_t txn = 0;
  Pending* slot = nullptr;
  r = add_pending(txn, slot);
  if (r != Result::Ok) return r;
  r = ch_.send(loop_, m, wire::FrameType::Request, txn, 0);
  if (r != Result::Ok) {
    drop_pending(txn);
    return r;
  }
  slot->done = std::move(done);
  slot->deadline = timeout_ms ? detail::now_ns() + static_cast<std::int64_t>(timeout_ms) * 1000000 : 0;
  if (timeout_ms) reschedule();
  return Result::Ok;
}

inline Result Session::request_sync(Message&& m, Message& response, int timeout_ms) noexcept {
  response.release();
  if (timeout_ms <= 0) return Result::BadParameter;
  Result r = check_outgoing(m);
  if (r != Result::Ok) return r;
  if (server_here_ && detail::served_by_this_thread(path_)) return Result::WouldDeadlock;
  std::uint32_t txn = 0;
  Pending* slot = nullptr;
  r = add_pending(txn, slot);
  if (r != Result::Ok) return r;  // (this call enforces its own timeout: no deadline)
  auto finish = [&](Result res) {
    drop_pending(txn);
    // What was set aside meanwhile is delivered from the loop.
    if (deferred_count_ || lost_pending_) {
      Result ra = loop_.arm_timer(timer_, 0);
      (void)ra;
    }
    return res;
  };
  r = ch_.send(loop_, m, wire::FrameType::Request, txn, 0);
  if (r != Result::Ok) {
    drop_pending(txn);
    return r;
  }
  const std::int64_t deadline = detail::now_ns() + static_cast<std::int64_t>(timeout_ms) * 1000000;
  for (;;) {
    const int left = detail::ms_until(deadline);
    bool wait = false;
    r = left == 0 ? Result::Timeout : wait_readable(left, wait);
    if (r == Result::WouldBlock) continue;
    if (r == Result::Timeout) {
      LEMSG_LOG(Info, "session %s: request_sync timed out after %d ms", name_, timeout_ms);
      return finish(r);
    }
    if (r != Result::Ok) return finish(r);
    Message in;
    wire::Header h;
    r = ch_.receive(pool_, protocol_.max_payload, in, h, wait);
    if (r == Result::WouldBlock) continue;  // no answer yet: the deadline decides
    if (r == Result::PoolEmpty) return finish(r);
    if (r == Result::Ok) r = check_incoming(h, in);
    if (r != Result::Ok) {
      lose_later(r);
      return finish(Result::Closed);
    }
    if (h.type == wire::FrameType::Response && h.txn == txn) {
      const Result status = in.status();
      if (status == Result::Ok) response = std::move(in);
      return finish(status);
    }
    if (deferred_count_ == LEMSG_MAX_DEFERRED) {
      LEMSG_LOG(Warning, "session %s: more than LEMSG_MAX_DEFERRED frames during request_sync; closing", name_);
      lose_later(Result::Overflow);
      return finish(Result::Overflow);
    }
    deferred_[(deferred_head_ + deferred_count_) % LEMSG_MAX_DEFERRED] = std::move(in);
    ++deferred_count_;
  }
}

inline Result Session::wait_readable(int left, bool& wait) noexcept {
  // Nothing left to send: wait inside recvmsg, one system call per answer
  // like a plain blocking client. Otherwise poll, to send and receive.
  wait = ch_.out.count == 0 && ch_.set_wait(left);
  if (wait) return Result::Ok;
  struct pollfd pfd = {ch_.fd, static_cast<short>(POLLIN | (ch_.out.count ? POLLOUT : 0)), 0};
  const int rc = ::poll(&pfd, 1, left);
  if (rc < 0) return errno == EINTR ? Result::WouldBlock : Result::SystemError;
  if (rc == 0) return Result::Timeout;
  if ((pfd.revents & POLLOUT) && ch_.flush(loop_) != Result::Ok) pfd.revents |= POLLHUP;
  return (pfd.revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL)) ? Result::Ok : Result::WouldBlock;
}

inline void Session::lose_later(Result why) noexcept {
  ch_.reset(loop_);
  state_ = State::Idle;
  lost_pending_ = true;
  lost_reason_ = why;
}

inline Result Session::add_pending(std::uint32_t& txn, Pending*& slot) noexcept {
  slot = nullptr;
  for (Pending& p : pending_)
    if (!p.used) {
      slot = &p;
      break;
    }
  if (!slot || pending_refs_.add(slot, txn) != Result::Ok) return Result::PendingTableFull;
  slot->used = true;
  slot->deadline = 0;
  return Result::Ok;
}

inline void Session::drop_pending(std::uint32_t txn) noexcept {
  Pending* p = pending_refs_.lookup(txn);
  if (!p) return;
  p->used = false;
  Result r = pending_refs_.remove(txn);
  (void)r;
}

inline Result Session::check_incoming(const wire::Header& h, Message& m) const noexcept {
  if (h.type != wire::FrameType::Message && h.type != wire::FrameType::Response) return Result::BadFrame;
  // An error response must carry a known error: one claiming Ok (0) is as
  // malformed as an unknown code, or the request would "succeed" empty.
  if ((h.flags & wire::FlagError) && !detail::known_result(m.blk_->status)) return Result::BadFrame;
  m.blk_->kind = h.type == wire::FrameType::Response ? detail::MsgKind::Response : detail::MsgKind::Received;
  return Result::Ok;
}

inline Result Session::server_credentials(Credentials& out) const noexcept {
  if (state_ != State::Open) return Result::Closed;
  out = server_;
  return Result::Ok;
}

inline void Session::reschedule() noexcept {
  std::int64_t next = 0;
  auto consider = [&](std::int64_t t) {
    if (t && (!next || t < next)) next = t;
  };
  const std::int64_t now = detail::now_ns();
  if (deferred_count_ || lost_pending_ || open_failed_ != Result::Ok) consider(now);
  pending_refs_.for_each([&](Pending* p, std::uint32_t) { consider(p->deadline); });
  if (state_ == State::Handshake) consider(handshake_deadline_);
  if (state_ == State::Backoff) consider(backoff_deadline_);
  if (ch_.starved) consider(now + 5 * 1000000);
  Result r = next ? loop_.arm_timer(timer_, static_cast<std::uint32_t>(detail::ms_until(next)))
                  : loop_.disarm_timer(timer_);
  (void)r;
}

inline void Session::on_timer() noexcept {
  if (open_failed_ != Result::Ok) {
    const Result why = open_failed_;
    open_failed_ = Result::Ok;
    if (open_cb_) {
      OpenCallback cb = open_cb_;
      if (!life_.call([&] { cb(why); })) return;
    }
  }
  if (lost_pending_) {
    lost_pending_ = false;
    if (!lose_server(lost_reason_)) return;
  }
  if (deferred_count_ && state_ == State::Open && !deliver_deferred()) return;
  const std::int64_t now = detail::now_ns();
  std::uint32_t late[LEMSG_MAX_PENDING];
  std::size_t n = 0;
  pending_refs_.for_each([&](Pending* p, std::uint32_t ref) {
    if (p->deadline && p->deadline <= now) late[n++] = ref;
  });
  for (std::size_t i = 0; i < n; ++i) {
    if (!pending_refs_.lookup(late[i])) continue;  // a handler above completed it
    LEMSG_LOG(Info, "session %s: request %lu timed out", name_, static_cast<unsigned long>(late[i]));
    if (!complete(late[i], Result::Timeout, nullptr)) return;
  }
  if (state_ == State::Handshake && handshake_deadline_ <= detail::now_ns()) {
    LEMSG_LOG(Warning, "session %s: server did not answer the hello in time", name_);
    ch_.reset(loop_);
    backoff();
  } else if (state_ == State::Backoff && backoff_deadline_ <= detail::now_ns()) {
    attempt();
  }
  if (ch_.starved && pool_.available()) {
    ch_.starved = false;
    ch_.update_events(loop_);
  }
  reschedule();
}


// =============================================================================
// 12. Typed interfaces                                                 >>typed
// =============================================================================
//
// Declare an interface once, in plain C++ types in a header that client and
// server share, and call it like functions: no code generator, no heap.
//
//   struct Signal { std::int32_t rssi; std::uint8_t bars; };      // plain structs:
//   struct Sms { lemsg::String<20> to; lemsg::String<160> text; }; // each field once
//   struct SmsId { std::uint32_t id; };
//   struct Registration { bool registered; lemsg::String<16> network; };
//
//   LEMSG_METHOD(GetSignal, lemsg::Void, Signal);   // request -> response
//   LEMSG_METHOD(SendSms, Sms, SmsId);
//   LEMSG_ONEWAY(SetLed, Led);                      // request, no response
//   LEMSG_EVENT(RegistrationChanged, Registration); // server -> subscribed clients
//   struct Modem : lemsg::Interface<GetSignal, SendSms, SetLed, RegistrationChanged> {
//     static constexpr const char* name = "acme.modem";
//   };
//
//   // server                                   // client
//   lemsg::TypedService<Modem> svc(loop, pool);  lemsg::TypedClient<Modem> modem(loop, pool);
//   svc.set_handler<GetSignal>(                  modem.open_sync("modem", 2000);
//     [](lemsg::Responder<GetSignal>& r,         Signal s;
//        lemsg::Void&) { r.reply({-71, 3}); });  modem.call<GetSignal>({}, s, 1000);
//   svc.advertise("modem");                      modem.subscribe<RegistrationChanged>(
//   svc.emit<RegistrationChanged>({true, ...});    [](Registration& r) { ... });
//
// A LEMSG_METHOD(Name, Req, Resp) is `struct Name : lemsg::Method<Req, Resp>
// { static constexpr const char* name = "Name"; }`; write that by hand when
// a type has a comma in it. Items are numbered in the order the Interface
// lists them (at most 255; at most 64 events).
//
// Field types (each bound is fixed at compile time):
//   bool, std::int8_t .. std::int64_t, std::uint8_t .. std::uint64_t
//   float, double        IEEE bits as they are: NaN and +-Inf round-trip
//   enums                as their underlying type; values are not checked
//   Flags<E>             a bitmask of the enum E's values
//   String<N>            at most N bytes, no NUL inside, NUL-terminated
//   Array<T, N>          at most N elements of a field type; Bytes<N> of bytes
//   Optional<T>          a field type or nothing
//   nested structs       aggregates of field types, at most 24 fields each
//   Fd                   an owned file descriptor; at most one per message
//   Ref<Tag>             a reference the server made for this session (below)
//   Void                 no fields
// Plain `char`, `long double`, pointers, references, raw arrays and structs
// with base classes are refused at compile time.
//
// Version safety: the protocol id is "<name>#<16 hex digits>", the digits an
// FNV-1a hash, computed at compile time, of every item in order (its kind,
// its name, and each field's type and bounds, nested structs included).
// A client built against a declaration that differs in any of these is
// refused at open with ProtocolMismatch. Field names do not travel and are
// not hashed: renaming a field is compatible; reordering fields is not.
// What C++17 cannot see is not hashed either: an enum is hashed as its width
// (its enumerators and values are not), and a Ref<Tag> as a reference (not
// its Tag, which a client may leave incomplete). Keep enums append-only and
// rename the interface when their meaning changes.
// The protocol's largest payload is computed from the bounds (max_payload).
//
// Encoding, byte by byte (little-endian throughout, no padding, no
// alignment; only the used bytes of strings and arrays travel):
//   bool                 1 byte, 0 or 1 (anything else is malformed)
//   intN/uintN, enums, Flags  N/8 bytes, two's complement
//   float / double       4 / 8 bytes: the IEEE-754 bit pattern
//   String<N>, Array<T,N>, Bytes<N>  a count, then the elements: the count
//                        is 1 byte when N < 256, 2 when N < 65536, else 4;
//                        a String's count is its length in bytes, no NUL
//   Optional<T>          1 byte, 0 (absent) or 1 (present, then T)
//   Fd                   1 byte, 0 (none) or 1 (the message carries the fd)
//   Ref<Tag>             4 bytes, the reference's value
//   struct               its fields in declaration order
// A frame's payload is:
//   client -> server, request or one-way: [item index: 1 byte][request]
//   client -> server, subscriptions:      [0xFF][event bits: 8 bytes]
//   server -> client, response:           [response]
//   server -> client, event:              [item index: 1 byte][event]
// Decoding checks every count against its bound and against the bytes that
// came, and refuses trailing bytes, an unknown index, an item sent the wrong
// way or as the wrong frame type, and an fd that nothing declares: the
// sending peer's session is closed with BadFrame and the reason logged, and
// no handler sees any part of that frame.
//
// References: the server binds a RefMap per Tag (bind_refs), makes references
// for the calling session (make_ref, owner = that session) and the entries go
// when the session closes. A request whose Ref fields do not all name a live
// entry of the calling session (another session's, a stale, a forged one) is
// refused before its handler runs: a method completes with BadReference, a
// one-way is dropped and logged. The session stays open.
//
// Memory: handlers, subscriptions and pending completions live inside the
// TypedService and TypedClient objects; encoding writes straight into the
// message's pooled block (a response into its request's block). Decoded
// values live on the dispatching thread's stack: budget the size of the
// largest request, response or event struct there.

namespace detail {
template <typename... T>
struct TypeList {};
template <typename T, typename Enable = void>
struct Codec;
struct TypedAccess;
}  // namespace detail

/// No fields: the request or response of an item that carries nothing.
struct Void {};

/// At most N bytes of text (no NUL inside), stored NUL-terminated.
template <std::size_t N>
class String {
  static_assert(N >= 1 && N <= (std::size_t{1} << 24), "String<N>: N must be 1..16 MiB");

 public:
  static constexpr std::size_t bound = N;
  // Only the terminator is written: a large String costs nothing to make.
  String() noexcept { data_[0] = 0; }
  /// From a string literal that fits (checked at compile time).
  template <std::size_t M>
  String(const char (&s)[M]) noexcept {  // NOLINT: implicit, so `{"text"}` initialises a field
    static_assert(M >= 1 && M - 1 <= N, "lemsg: this literal is longer than the String's bound");
    Result r = assign(s, std::strlen(s));
    (void)r;
  }
  /// Copies `s`: Ok, BoundExceeded (longer than N) or BadParameter (nullptr,
  /// or a NUL inside); on failure the string is unchanged.
  Result assign(const char* s) noexcept { return s ? assign(s, std::strlen(s)) : Result::BadParameter; }
  Result assign(const char* s, std::size_t n) noexcept {
    if (n > N) return Result::BoundExceeded;
    if (n && (!s || std::memchr(s, 0, n))) return Result::BadParameter;
    if (n) std::memcpy(data_, s, n);
    data_[n] = 0;
    size_ = static_cast<std::uint32_t>(n);
    return Result::Ok;
  }
  void clear() noexcept { data_[0] = 0, size_ = 0; }
  const char* c_str() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }
  friend bool operator==(const String& a, const char* b) noexcept { return b && std::strcmp(a.data_, b) == 0; }
  friend bool operator!=(const String& a, const char* b) noexcept { return !(a == b); }
  friend bool operator==(const String& a, const String& b) noexcept {
    return a.size_ == b.size_ && std::memcmp(a.data_, b.data_, a.size_) == 0;
  }

 private:
  template <typename, typename>
  friend struct detail::Codec;
  char data_[N + 1];
  std::uint32_t size_ = 0;
};

/// At most N elements of a field type, with their count.
template <typename T, std::size_t N>
class Array {
  static_assert(N >= 1 && N <= (std::size_t{1} << 24), "Array<T, N>: N must be 1..16 Mi");

 public:
  static constexpr std::size_t bound = N;
  Array() noexcept {}
  /// Appends a copy: Ok, or BoundExceeded when N are there.
  Result push_back(const T& v) noexcept {
    if (count_ == N) return Result::BoundExceeded;
    items_[count_++] = v;
    return Result::Ok;
  }
  /// Sets the count (new elements keep what their storage held). Ok or BoundExceeded.
  Result resize(std::size_t n) noexcept {
    if (n > N) return Result::BoundExceeded;
    count_ = static_cast<std::uint32_t>(n);
    return Result::Ok;
  }
  void clear() noexcept { count_ = 0; }
  std::size_t size() const noexcept { return count_; }
  bool empty() const noexcept { return count_ == 0; }
  /// Element i < size() (not checked, as for a C array).
  T& operator[](std::size_t i) noexcept { return items_[i]; }
  const T& operator[](std::size_t i) const noexcept { return items_[i]; }
  T* data() noexcept { return items_; }
  const T* data() const noexcept { return items_; }
  T* begin() noexcept { return items_; }
  T* end() noexcept { return items_ + count_; }
  const T* begin() const noexcept { return items_; }
  const T* end() const noexcept { return items_ + count_; }

 private:
  template <typename, typename>
  friend struct detail::Codec;
  T items_[N];
  std::uint32_t count_ = 0;
};

/// At most N bytes, with their count: a byte buffer.
template <std::size_t N>
class Bytes : public Array<std::uint8_t, N> {
 public:
  Bytes() noexcept {}
  /// Copies `n` bytes: Ok, BoundExceeded (n > N; unchanged) or BadParameter (nullptr).
  Result assign(const void* p, std::size_t n) noexcept {
    if (n > N) return Result::BoundExceeded;
    if (n && !p) return Result::BadParameter;
    if (n) std::memcpy(this->data(), p, n);
    return this->resize(n);
  }
};

/// A field type, or nothing.
template <typename T>
class Optional {
 public:
  Optional() noexcept {}
  Optional(const T& v) noexcept : value_(v), has_(true) {}  // NOLINT: implicit, as std::optional
  bool has_value() const noexcept { return has_; }
  explicit operator bool() const noexcept { return has_; }
  /// The value (meaningful only when has_value()).
  T& operator*() noexcept { return value_; }
  const T& operator*() const noexcept { return value_; }
  T* operator->() noexcept { return &value_; }
  const T* operator->() const noexcept { return &value_; }
  /// Makes it present and returns the value to fill in.
  T& emplace() noexcept {
    value_ = T{};
    has_ = true;
    return value_;
  }
  void reset() noexcept {
    value_ = T{};
    has_ = false;
  }

 private:
  template <typename, typename>
  friend struct detail::Codec;
  T value_{};
  bool has_ = false;
};

/// A bitmask of an enum's values (Legato's BITMASK): travels as the enum's
/// underlying type.
template <typename E>
class Flags {
  static_assert(std::is_enum<E>::value, "Flags<E>: E must be an enum");

 public:
  using Bits = std::make_unsigned_t<std::underlying_type_t<E>>;
  constexpr Flags() noexcept {}
  constexpr Flags(E e) noexcept : bits_(static_cast<Bits>(e)) {}  // NOLINT: implicit, so `Flags<E> f = E::A`
  constexpr explicit Flags(Bits b, int) noexcept : bits_(b) {}
  constexpr bool has(E e) const noexcept { return (bits_ & static_cast<Bits>(e)) == static_cast<Bits>(e); }
  constexpr Flags& set(E e) noexcept { return bits_ = static_cast<Bits>(bits_ | static_cast<Bits>(e)), *this; }
  constexpr Flags& unset(E e) noexcept { return bits_ = static_cast<Bits>(bits_ & ~static_cast<Bits>(e)), *this; }
  constexpr Bits bits() const noexcept { return bits_; }
  friend constexpr Flags operator|(Flags a, Flags b) noexcept { return Flags(static_cast<Bits>(a.bits_ | b.bits_), 0); }
  friend constexpr bool operator==(Flags a, Flags b) noexcept { return a.bits_ == b.bits_; }
  friend constexpr bool operator!=(Flags a, Flags b) noexcept { return a.bits_ != b.bits_; }

 private:
  template <typename, typename>
  friend struct detail::Codec;
  Bits bits_ = 0;
};

/// An owned file descriptor (Legato's `file`): closed when the Fd goes.
/// Sending encodes a duplicate (the sender keeps its own); a received one
/// is the receiver's to keep (release()) or to let close. At most one per
/// message (a compile-time check).
class Fd {
 public:
  Fd() noexcept {}
  explicit Fd(int fd) noexcept : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) reset(o.release());
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { reset(); }
  int get() const noexcept { return fd_; }
  bool valid() const noexcept { return fd_ >= 0; }
  /// Gives the descriptor up (the caller closes it); -1 when none.
  int release() noexcept {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }
  /// Closes the one held and takes `fd` (-1: none).
  void reset(int fd = -1) noexcept {
    if (fd_ >= 0 && fd_ != fd) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

/// A reference to one of the server's objects, made for one session
/// (TypedService::make_ref). `Tag` names the kind of object; the client may
/// leave it incomplete. 0 is never a valid reference.
template <typename Tag>
struct Ref {
  using TagType = Tag;
  std::uint32_t value = 0;
  Ref() noexcept {}
  explicit Ref(std::uint32_t v) noexcept : value(v) {}
  explicit operator bool() const noexcept { return value != 0; }
  friend bool operator==(Ref a, Ref b) noexcept { return a.value == b.value; }
  friend bool operator!=(Ref a, Ref b) noexcept { return a.value != b.value; }
};

enum class ItemKind : std::uint8_t { Method = 1, OneWay = 2, Event = 3 };

/// A method: Req from the client, Resp back. Derive a named struct (or use LEMSG_METHOD).
template <typename Req, typename Resp>
struct Method {
  using Request = Req;
  using Response = Resp;
  static constexpr ItemKind kind = ItemKind::Method;
};
/// A one-way call: Req from the client, no response.
template <typename Req>
struct OneWay {
  using Request = Req;
  using Response = Void;
  static constexpr ItemKind kind = ItemKind::OneWay;
};
/// An event: Payload from the server to each session subscribed to it.
template <typename Payload>
struct Event {
  using Request = Payload;
  using Response = Void;
  static constexpr ItemKind kind = ItemKind::Event;
};

#define LEMSG_METHOD(Name, Req, Resp)                  \
  struct Name : ::lemsg::Method<Req, Resp> {           \
    static constexpr const char* name = #Name;         \
  }
#define LEMSG_ONEWAY(Name, Req)                        \
  struct Name : ::lemsg::OneWay<Req> {                 \
    static constexpr const char* name = #Name;         \
  }
#define LEMSG_EVENT(Name, Payload)                     \
  struct Name : ::lemsg::Event<Payload> {              \
    static constexpr const char* name = #Name;         \
  }

/// The items of an interface, in order. Derive the interface from it and
/// give it `static constexpr const char* name` (1..47 characters).
template <typename... Items>
struct Interface {
  static_assert(sizeof...(Items) >= 1 && sizeof...(Items) <= 255, "an Interface has 1..255 items");
  using ItemList = detail::TypeList<Items...>;
};

/// What a typed Service knows of the interface I, all computed at compile
/// time: the protocol id and hash, the largest payload, item indexes.
template <typename I>
struct InterfaceInfo;

/// Who called a one-way item.
struct Caller {
  SessionRef session;
};

/// The right to answer one call of method M, exactly once. Move it to
/// answer later; dropping it unanswered completes the client's call with
/// Unanswered. It stays valid after its TypedService is gone (answering then
/// returns Closed). One pointer in size.
template <typename M>
class Responder {
 public:
  Responder() noexcept = default;
  Responder(Responder&&) noexcept = default;
  Responder& operator=(Responder&&) noexcept = default;
  Responder(const Responder&) = delete;
  Responder& operator=(const Responder&) = delete;

  /// True while the call is still owed an answer.
  explicit operator bool() const noexcept { return msg_.needs_response(); }
  SessionRef session() const noexcept { return msg_.session(); }
  /// The caller's uid, gid and pid. Ok, or Closed when the session is gone.
  Result credentials(Credentials& out) const noexcept;
  /// Answers with `resp` (encoded into the request's own block). Ok; Closed
  /// (the session is gone); BadParameter (already answered); SystemError
  /// (an Fd could not be duplicated); the errors of Service::respond. The
  /// call is answered afterwards whatever the Result.
  Result reply(const typename M::Response& resp) noexcept;
  /// Completes the client's call with `code` (not Ok) instead of a response.
  /// Ok, Closed, or BadParameter (already answered, or code is Ok).
  Result fail(Result code) noexcept;

 private:
  template <typename>
  friend class TypedService;
  explicit Responder(Message&& m) noexcept : msg_(std::move(m)) {}
  Message msg_;
};

/// Handler of method M: the right to answer, and the decoded request (the
/// handler may take an Fd out of it).
template <typename M>
using MethodHandler = Callable<void(Responder<M>&, typename M::Request&)>;
/// Handler of one-way item M.
template <typename M>
using OneWayHandler = Callable<void(const Caller&, typename M::Request&)>;
/// Handler of event E on a client.
template <typename E>
using EventHandler = Callable<void(typename E::Request&)>;

namespace detail {
// A tuple of one T per index, with no <tuple>.
template <std::size_t K, typename T>
struct Slot {
  T value;
};
template <typename Seq, typename... T>
struct Slots;
template <std::size_t... K, typename... T>
struct Slots<std::index_sequence<K...>, T...> : Slot<K, T>... {};
template <std::size_t K, typename T>
T& slot_at(Slot<K, T>& s) noexcept {
  return s.value;
}
struct NoHandler {};
template <typename M>
using ServerHandlerOf = std::conditional_t<
    M::kind == ItemKind::Method, MethodHandler<M>,
    std::conditional_t<M::kind == ItemKind::OneWay, OneWayHandler<M>, NoHandler>>;
template <typename M>
using ClientHandlerOf = std::conditional_t<M::kind == ItemKind::Event, EventHandler<M>, NoHandler>;
template <typename I, template <typename> class Of, typename L = typename I::ItemList>
struct HandlerSlots;
template <typename I, template <typename> class Of, typename... Items>
struct HandlerSlots<I, Of, TypeList<Items...>> {
  using type = Slots<std::index_sequence_for<Items...>, Of<Items>...>;
};
}  // namespace detail

/// The server end of interface I: a Service whose frames are decoded and
/// dispatched to one handler per item. Owned by the caller, used on its
/// Loop's thread; the pool must hold InterfaceInfo<I>::max_payload bytes
/// per message (MessagePool<InterfaceInfo<I>::max_payload, Count>).
/// service() gives the Service for open and close handlers, credentials,
/// contexts, close() and options; do not set its receive handler.
template <typename I>
class TypedService {
 public:
  using Info = InterfaceInfo<I>;
  TypedService(Loop& loop, MessagePoolBase& pool) noexcept;
  TypedService(const TypedService&) = delete;
  TypedService& operator=(const TypedService&) = delete;

  /// As Service::status().
  Result status() const noexcept { return svc_.status(); }
  /// As Service::advertise() and hide().
  Result advertise(const char* name, const ServiceOptions& options = ServiceOptions{}) noexcept {
    return svc_.advertise(name, options);
  }
  Result hide() noexcept { return svc_.hide(); }
  Service& service() noexcept { return svc_; }

  /// Sets the handler of method or one-way item M (replacing any before).
  /// A method: void(Responder<M>&, Request&); it answers through the
  /// Responder, now or later. A one-way item: void(const Caller&, Request&).
  /// An item without a handler: a method completes with Unanswered, a
  /// one-way frame is dropped (both logged at debug level).
  template <typename M, typename F>
  void set_handler(F&& f) noexcept;

  /// Sends event E to every session subscribed to it, now (queued for a
  /// client that is not reading; a subscriber whose queue is full has its
  /// session closed with Overflow, and the others get the event). Ok, or the
  /// first error met (PoolEmpty, SystemError...), the rest still served.
  template <typename E>
  Result emit(const typename E::Request& event) noexcept;
  /// How many sessions are subscribed to event E.
  template <typename E>
  std::size_t subscriber_count() const noexcept;

  /// Lets Ref<Tag> fields resolve through `map`: make_ref adds to it, and
  /// when a session closes its entries are removed and passed to `release`
  /// (as Service::track; nullptr: just removed). At most LEMSG_MAX_TRACKED maps, one per Tag.
  /// Ok, Duplicate (Tag already bound), or the errors of Service::track.
  template <typename Tag>
  Result bind_refs(RefMapBase& map, TrackRelease release) noexcept;
  /// Adds `obj` to Tag's map, owned by session `s`: Ok with `out` set,
  /// NotFound (Tag not bound, or no such session), NoMemory (map full),
  /// BadParameter (nullptr).
  template <typename Tag>
  Result make_ref(SessionRef s, Tag* obj, Ref<Tag>& out) noexcept;
  /// The object of a reference (nullptr when it does not resolve). Inside a
  /// handler, every Ref field of the request resolves to the caller's own.
  template <typename Tag>
  Tag* object(Ref<Tag> ref) const noexcept;
  /// Removes a reference's entry: Ok or NotFound.
  template <typename Tag>
  Result drop_ref(Ref<Tag> ref) noexcept;

 private:
  template <std::size_t K>
  void dispatch(Message& m, bool request) noexcept;
  template <std::size_t... K>
  void dispatch_index(std::size_t index, Message& m, bool request, std::index_sequence<K...>) noexcept;
  void on_frame(Message& m) noexcept;
  // Closes the sender's session with BadFrame. False: the Service is gone.
  bool refuse_frame(SessionRef s, const char* why) noexcept;
  template <typename Tag>
  RefMapBase* map_for() const noexcept;
  template <typename T>
  bool refs_resolve(SessionRef s, T& value) const noexcept;

  struct Binding {
    const void* tag = nullptr;
    RefMapBase* map = nullptr;
  };
  Service svc_;
  typename detail::HandlerSlots<I, detail::ServerHandlerOf>::type handlers_;
  Binding refs_[LEMSG_MAX_TRACKED];
};

/// The client end of interface I: a Session with typed calls and events.
/// Owned by the caller, used on its Loop's thread; the pool must hold
/// InterfaceInfo<I>::max_payload bytes per message. session() gives the
/// Session for open, close, reconnect and its close handler; do not set its
/// receive handler. Subscriptions are kept here and sent again each time the
/// session opens (also after a reconnect), so a client that outlives a server
/// restart keeps its events.
template <typename I>
class TypedClient {
 public:
  using Info = InterfaceInfo<I>;
  TypedClient(Loop& loop, MessagePoolBase& pool) noexcept;
  TypedClient(const TypedClient&) = delete;
  TypedClient& operator=(const TypedClient&) = delete;

  Result status() const noexcept { return session_.status(); }
  Session& session() noexcept { return session_; }
  /// As Session::open, open_sync, try_open, close and is_open.
  Result open(const char* name, OpenCallback cb = nullptr) noexcept { return session_.open(name, std::move(cb)); }
  Result open_sync(const char* name, int timeout_ms) noexcept { return session_.open_sync(name, timeout_ms); }
  Result try_open(const char* name) noexcept { return session_.try_open(name); }
  void close() noexcept { session_.close(); }
  bool is_open() const noexcept { return session_.is_open(); }

  /// Calls method M and waits at most `timeout_ms` (> 0). Ok with `resp`
  /// filled; BadFrame (a malformed response: the session is closed); the
  /// errors of Session::request_sync, and of the server's Responder::fail.
  /// On any error `resp` is reset to its empty value.
  template <typename M>
  Result call(const typename M::Request& req, typename M::Response& resp, int timeout_ms) noexcept;
  /// Calls method M; done(Result, Response&) runs exactly once on the loop,
  /// as for Session::request (BadFrame for a malformed response, which also
  /// closes the session). `done` may capture up to LEMSG_CALLABLE_SIZE minus
  /// one pointer, and may own move-only objects (a Responder, to relay).
  /// Returns as Session::request (then `done` is not called).
  template <typename M, typename F>
  Result call_async(const typename M::Request& req, F&& done, std::uint32_t timeout_ms = 0) noexcept;
  /// Sends one-way item M. As Session::send.
  template <typename M>
  Result send(const typename M::Request& req) noexcept;
  /// Subscribes to event E: handler(Payload&) runs for each one. Ok (sent,
  /// or remembered until the session opens), or the error sending it
  /// (Overflow, PoolEmpty...; then nothing changed).
  template <typename E, typename F>
  Result subscribe(F&& handler) noexcept;
  /// Stops event E. Ok, or the error sending it (then still subscribed).
  template <typename E>
  Result unsubscribe() noexcept;
  template <typename E>
  bool is_subscribed() const noexcept {
    static_assert(Info::template index_of<E> < Info::item_count && E::kind == ItemKind::Event,
                  "lemsg: is_subscribed<E>: E is not an event of this interface");
    return (subscribed_ >> Info::template index_of<E>) & 1u;
  }

 private:
  template <typename M>
  Result encode_request(const typename M::Request& req, Message& out) noexcept;
  Result send_subscriptions(std::uint64_t bits) noexcept;
  static void opened(void* self) noexcept;
  void on_event(Message& m) noexcept;
  template <std::size_t... K>
  void event_index(std::size_t index, Message& m, std::index_sequence<K...>) noexcept;
  template <std::size_t K>
  void deliver_event(Message& m) noexcept;
  void refuse_frame(const char* why) noexcept;

  Session session_;
  typename detail::HandlerSlots<I, detail::ClientHandlerOf>::type handlers_;
  std::uint64_t subscribed_ = 0;
};

/// A MessagePool sized for interface I: Count messages of its largest payload.
template <typename I, std::size_t Count>
using TypedPool = MessagePool<InterfaceInfo<I>::max_payload, Count>;

// -- implementation --

namespace detail {

// ---- aggregate reflection: a struct's fields, written once, found by the
// compiler. count_fields<T> is the most initialisers T{...} takes (each one
// converts to anything); apply_fields binds that many with a structured
// binding, which fails to compile when the count is wrong (a raw array or a
// base class), so a miscount never goes unnoticed.
struct AnyField {
  template <typename U>
  operator U() const noexcept;  // declared only: used in decltype
};
template <typename T, typename Seq, typename = void>
struct InitsWith : std::false_type {};
template <typename T, std::size_t... K>
struct InitsWith<T, std::index_sequence<K...>, std::void_t<decltype(T{(static_cast<void>(K), AnyField{})...})>>
    : std::true_type {};
constexpr std::size_t max_fields = 24;
template <typename T, std::size_t N = 0>
constexpr std::size_t count_fields() noexcept {
  if constexpr (N < max_fields + 1 && InitsWith<T, std::make_index_sequence<N + 1>>::value)
    return count_fields<T, N + 1>();
  else
    return N;
}

template <typename T, typename F>
decltype(auto) apply_fields(T& t, F&& f) {
  constexpr std::size_t n = count_fields<std::remove_const_t<T>>();
  static_assert(n <= max_fields, "lemsg: a struct has at most 24 fields; nest structs for more");
  // clang-format off
  if constexpr (n == 0) { (void)t; return f(); }
  else if constexpr (n == 1) { auto& [a] = t; return f(a); }
  else if constexpr (n == 2) { auto& [a, b] = t; return f(a, b); }
  else if constexpr (n == 3) { auto& [a, b, c] = t; return f(a, b, c); }
  else if constexpr (n == 4) { auto& [a, b, c, d] = t; return f(a, b, c, d); }
  else if constexpr (n == 5) { auto& [a, b, c, d, e] = t; return f(a, b, c, d, e); }
  else if constexpr (n == 6) { auto& [a, b, c, d, e, g] = t; return f(a, b, c, d, e, g); }
  else if constexpr (n == 7) { auto& [a, b, c, d, e, g, h] = t; return f(a, b, c, d, e, g, h); }
  else if constexpr (n == 8) { auto& [a, b, c, d, e, g, h, i] = t; return f(a, b, c, d, e, g, h, i); }
  else if constexpr (n == 9) { auto& [a, b, c, d, e, g, h, i, j] = t; return f(a, b, c, d, e, g, h, i, j); }
  else if constexpr (n == 10) { auto& [a, b, c, d, e, g, h, i, j, k] = t; return f(a, b, c, d, e, g, h, i, j, k); }
  else if constexpr (n == 11) { auto& [a, b, c, d, e, g, h, i, j, k, l] = t; return f(a, b, c, d, e, g, h, i, j, k, l); }
  else if constexpr (n == 12) { auto& [a, b, c, d, e, g, h, i, j, k, l, m] = t; return f(a, b, c, d, e, g, h, i, j, k, l, m); }
  else if constexpr (n == 13) { auto& [a, b, c, d, e, g, h, i, j, k, l, m, o] = t; return f(a, b, c, d, e, g, h, i, j, k, l, m, o); }
  else if constexpr (n == 14) { auto& [a, b, c, d, e, g, h, i, j, k, l, m, o, p] = t; return f(a, b, c, d, e, g, h, i, j, k, l, m, o, p); }
  else if constexpr (n == 15) { auto& [a, b, c, d, e, g, h, i, j, k, l, m, o, p, q] = t; return f(a, b, c, d, e, g, h, i, j, k, l, m, o, p, q); }
  else if constexpr (n == 16) { auto& [a, b, c, d, e, g, h, i, j, k, l, m, o, p, q, r] = t; return f(a, b, c, d, e, g, h, i, j, k, l, m, o, p, q, r); }
  else if constexpr (n == 17) { auto& [a, b, c, d, e, g, h, i, j, k, l, m, o, p, q, r, s] = t; return f(a, b, c, d, e, g, h, i, j, k, l, m, o, p, q, r, s); }
  else if constexpr (n == 18) { auto& [a, b, c, d, e, g, h, i, j, k, l, m, o, p, q, r, s, u] = t; return f(a, b, c, d, e, g, h, i, j, k, l, m, o, p, q, r, s, u); }
  else if constexpr (n == 19) { auto& [a, b, c, d, e, g, h, i, j, k, l, m, o, p, q, r, s, u, v] = t; return f(a, b, c, d, e, g, h, i, j, k, l, m, o, p, q, r, s, u, v); }
  else if constexpr (n == 20) { auto& [a, b, c, d, e, g, h, i, j, k, l, m, o, p, q, r, s, u, v, w] = t; return f(a, b, c, d, e, g, h, i, j, k, l, m, o, p, q, r, s, u, v, w); }
  else if constexpr (n == 21) { auto& [a, b, c, d, e, g, h, i, j, k, l, m, o, p, q, r, s, u, v, w, x] = t; return f(a, b, c, d, e, g, h, i, j, k, l, m, o, p, q, r, s, u, v, w, x); }
  else if constexpr (n == 22) { auto& [a, b, c, d, e, g, h, i, j, k, l, m, o, p, q, r, s, u, v, w, x, y] = t; return f(a, b, c, d, e, g, h, i, j, k, l, m, o, p, q, r, s, u, v, w, x, y); }
  else if constexpr (n == 23) { auto& [a, b, c, d, e, g, h, i, j, k, l, m, o, p, q, r, s, u, v, w, x, y, z] = t; return f(a, b, c, d, e, g, h, i, j, k, l, m, o, p, q, r, s, u, v, w, x, y, z); }
  else { auto& [a, b, c, d, e, g, h, i, j, k, l, m, o, p, q, r, s, u, v, w, x, y, z, a2] = t; return f(a, b, c, d, e, g, h, i, j, k, l, m, o, p, q, r, s, u, v, w, x, y, z, a2); }
  // clang-format on
}
struct FieldTypes {
  template <typename... X>
  TypeList<std::remove_cv_t<X>...> operator()(X&...) const noexcept {
    return {};
  }
};
template <typename T>
using FieldsOf = decltype(apply_fields(std::declval<T&>(), FieldTypes{}));

template <std::size_t K, typename L>
struct TypeAtImpl;
template <std::size_t K, typename H, typename... T>
struct TypeAtImpl<K, TypeList<H, T...>> : TypeAtImpl<K - 1, TypeList<T...>> {};
template <typename H, typename... T>
struct TypeAtImpl<0, TypeList<H, T...>> {
  using type = H;
};
template <std::size_t K, typename L>
using TypeAt = typename TypeAtImpl<K, L>::type;

// ---- the declaration hash: 64-bit FNV-1a over a description of each item.
struct Fnv {
  std::uint64_t v = 14695981039346656037ull;
  constexpr void byte(std::uint8_t b) noexcept {
    v ^= b;
    v *= 1099511628211ull;
  }
  constexpr void num(std::uint64_t n) noexcept {
    for (int i = 0; i < 8; ++i) byte(static_cast<std::uint8_t>(n >> (8 * i)));
  }
  constexpr void str(const char* s) noexcept {
    for (; *s; ++s) byte(static_cast<std::uint8_t>(*s));
    byte(0);
  }
};

// ---- the encoder and decoder: bounds-checked cursors over the payload.
struct Writer {
  unsigned char* p;
  unsigned char* end;
  int fd = -1;  // the Fd field's descriptor (borrowed), -1 when none
  bool ok = true;
  void raw(const void* src, std::size_t n) noexcept {
    if (static_cast<std::size_t>(end - p) < n) {
      ok = false;
      return;
    }
    if (n) std::memcpy(p, src, n);
    p += n;
  }
  template <typename U>
  void uint(U v) noexcept {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    raw(&v, sizeof v);
#else
    unsigned char b[sizeof(U)];
    for (std::size_t i = 0; i < sizeof(U); ++i) b[i] = static_cast<unsigned char>(v >> (8 * i));
    raw(b, sizeof b);
#endif
  }
};
struct Reader {
  const unsigned char* p;
  const unsigned char* end;
  int fd = -1;  // the frame's descriptor until a Fd field takes it
  bool ok = true;
  bool raw(void* dst, std::size_t n) noexcept {
    if (!ok || static_cast<std::size_t>(end - p) < n) return ok = false;
    if (n) std::memcpy(dst, p, n);
    p += n;
    return true;
  }
  template <typename U>
  U uint() noexcept {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    U v = 0;
    raw(&v, sizeof v);
    return v;
#else
    unsigned char b[sizeof(U)] = {};
    raw(b, sizeof b);
    U v = 0;
    for (std::size_t i = 0; i < sizeof(U); ++i) v = static_cast<U>(v | (static_cast<U>(b[i]) << (8 * i)));
    return v;
#endif
  }
};

// The count in front of a String, Array or Bytes: as few bytes as N needs.
template <std::size_t N>
using CountType = std::conditional_t<(N < 256), std::uint8_t, std::conditional_t<(N < 65536), std::uint16_t, std::uint32_t>>;

template <typename>
constexpr bool always_false = false;

// Codec<T>: max_size (bytes at most), fds (Fd fields), has_refs, feed()
// (the hash), put(), get() and each_ref(). The primary template refuses.
template <typename T, typename Enable>
struct Codec {
  static_assert(always_false<T>,
                "lemsg: this type cannot be a typed-interface field (use fixed-width integers, bool, float, "
                "double, enums, Flags, String, Array, Bytes, Optional, Fd, Ref or a struct of those)");
};

// Fixed-width integers. Plain char is refused: its signedness differs
// between the host and ARM.
template <typename T>
struct Codec<T, std::enable_if_t<std::is_integral<T>::value && !std::is_same<T, bool>::value>> {
  static_assert(!std::is_same<T, char>::value, "lemsg: use std::int8_t, std::uint8_t or String<N> instead of char");
  using U = std::make_unsigned_t<T>;
  static constexpr std::size_t max_size = sizeof(T);
  static constexpr std::size_t fds = 0;
  static constexpr bool has_refs = false;
  static constexpr void feed(Fnv& h) noexcept {
    h.byte(std::is_signed<T>::value ? 'i' : 'u');
    h.byte(sizeof(T));
  }
  static void put(Writer& w, const T& v) noexcept { w.uint(static_cast<U>(v)); }
  static void get(Reader& r, T& v) noexcept { v = static_cast<T>(r.uint<U>()); }
};

template <>
struct Codec<bool> {
  static constexpr std::size_t max_size = 1;
  static constexpr std::size_t fds = 0;
  static constexpr bool has_refs = false;
  static constexpr void feed(Fnv& h) noexcept { h.byte('b'); }
  static void put(Writer& w, const bool& v) noexcept { w.uint(static_cast<std::uint8_t>(v ? 1 : 0)); }
  static void get(Reader& r, bool& v) noexcept {
    const std::uint8_t b = r.uint<std::uint8_t>();
    if (b > 1) r.ok = false;
    v = b == 1;
  }
};

template <typename T>
struct Codec<T, std::enable_if_t<std::is_floating_point<T>::value>> {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "lemsg: only float and double travel");
  using U = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
  static_assert(std::numeric_limits<T>::is_iec559, "lemsg: float and double must be IEEE-754 here");
  static constexpr std::size_t max_size = sizeof(T);
  static constexpr std::size_t fds = 0;
  static constexpr bool has_refs = false;
  static constexpr void feed(Fnv& h) noexcept {
    h.byte('f');
    h.byte(sizeof(T));
  }
  static void put(Writer& w, const T& v) noexcept {
    U bits;
    std::memcpy(&bits, &v, sizeof bits);
    w.uint(bits);
  }
  static void get(Reader& r, T& v) noexcept {
    const U bits = r.uint<U>();
    std::memcpy(&v, &bits, sizeof v);
  }
};

template <typename T>
struct Codec<T, std::enable_if_t<std::is_enum<T>::value>> {
  using U = std::make_unsigned_t<std::underlying_type_t<T>>;
  static constexpr std::size_t max_size = sizeof(U);
  static constexpr std::size_t fds = 0;
  static constexpr bool has_refs = false;
  static constexpr void feed(Fnv& h) noexcept {
    h.byte('e');
    h.byte(sizeof(U));
  }
  static void put(Writer& w, const T& v) noexcept { w.uint(static_cast<U>(v)); }
  static void get(Reader& r, T& v) noexcept { v = static_cast<T>(r.uint<U>()); }
};

template <typename E>
struct Codec<Flags<E>> {
  using U = typename Flags<E>::Bits;
  static constexpr std::size_t max_size = sizeof(U);
  static constexpr std::size_t fds = 0;
  static constexpr bool has_refs = false;
  static constexpr void feed(Fnv& h) noexcept {
    h.byte('m');
    h.byte(sizeof(U));
  }
  static void put(Writer& w, const Flags<E>& v) noexcept { w.uint(v.bits_); }
  static void get(Reader& r, Flags<E>& v) noexcept { v.bits_ = r.uint<U>(); }
};

template <std::size_t N>
struct Codec<String<N>> {
  using C = CountType<N>;
  static constexpr std::size_t max_size = sizeof(C) + N;
  static constexpr std::size_t fds = 0;
  static constexpr bool has_refs = false;
  static constexpr void feed(Fnv& h) noexcept {
    h.byte('s');
    h.num(N);
  }
  static void put(Writer& w, const String<N>& v) noexcept {
    w.uint(static_cast<C>(v.size_));
    w.raw(v.data_, v.size_);
  }
  static void get(Reader& r, String<N>& v) noexcept {
    const std::size_t n = r.uint<C>();
    if (n > N || !r.raw(v.data_, n) || std::memchr(v.data_, 0, n)) {
      r.ok = false;
      v.clear();
      return;
    }
    v.data_[n] = 0;
    v.size_ = static_cast<std::uint32_t>(n);
  }
};

template <typename T, std::size_t N>
struct Codec<Array<T, N>> {
  using C = CountType<N>;
  using E = Codec<T>;
  static_assert(E::fds == 0, "lemsg: an Fd cannot be an array element (one Fd per message)");
  static constexpr bool bytes = std::is_same<T, std::uint8_t>::value || std::is_same<T, std::int8_t>::value;
  static constexpr std::size_t max_size = sizeof(C) + N * E::max_size;
  static constexpr std::size_t fds = 0;
  static constexpr bool has_refs = E::has_refs;
  static constexpr void feed(Fnv& h) noexcept {
    h.byte('a');
    h.num(N);
    E::feed(h);
  }
  static void put(Writer& w, const Array<T, N>& v) noexcept {
    w.uint(static_cast<C>(v.count_));
    if constexpr (bytes) {
      w.raw(v.items_, v.count_);
    } else {
      for (std::uint32_t i = 0; i < v.count_; ++i) E::put(w, v.items_[i]);
    }
  }
  static void get(Reader& r, Array<T, N>& v) noexcept {
    const std::size_t n = r.uint<C>();
    v.count_ = 0;
    if (n > N) {
      r.ok = false;
      return;
    }
    if constexpr (bytes) {
      if (!r.raw(v.items_, n)) return;
    } else {
      // Each element needs a byte at least, except in an array of empty
      // structs: a count beyond the bytes left is refused before the loop.
      if (E::max_size && n > static_cast<std::size_t>(r.end - r.p)) {
        r.ok = false;
        return;
      }
      for (std::size_t i = 0; i < n && r.ok; ++i) E::get(r, v.items_[i]);
      if (!r.ok) return;
    }
    v.count_ = static_cast<std::uint32_t>(n);
  }
  template <typename F>
  static void each_ref(Array<T, N>& v, F& f) noexcept {
    for (std::uint32_t i = 0; i < v.count_; ++i) E::each_ref(v.items_[i], f);
  }
};

template <std::size_t N>
struct Codec<Bytes<N>> : Codec<Array<std::uint8_t, N>> {
  static constexpr void feed(Fnv& h) noexcept {
    h.byte('y');
    h.num(N);
  }
};

template <typename T>
struct Codec<Optional<T>> {
  using E = Codec<T>;
  static constexpr std::size_t max_size = 1 + E::max_size;
  static constexpr std::size_t fds = E::fds;
  static constexpr bool has_refs = E::has_refs;
  static constexpr void feed(Fnv& h) noexcept {
    h.byte('?');
    E::feed(h);
  }
  static void put(Writer& w, const Optional<T>& v) noexcept {
    w.uint(static_cast<std::uint8_t>(v.has_ ? 1 : 0));
    if (v.has_) E::put(w, v.value_);
  }
  static void get(Reader& r, Optional<T>& v) noexcept {
    const std::uint8_t b = r.uint<std::uint8_t>();
    v.has_ = b == 1;
    if (b > 1) r.ok = false;
    if (b == 1) E::get(r, v.value_);
  }
  template <typename F>
  static void each_ref(Optional<T>& v, F& f) noexcept {
    if (v.has_) E::each_ref(v.value_, f);
  }
};

template <>
struct Codec<Fd> {
  static constexpr std::size_t max_size = 1;
  static constexpr std::size_t fds = 1;
  static constexpr bool has_refs = false;
  static constexpr void feed(Fnv& h) noexcept { h.byte('F'); }
  static void put(Writer& w, const Fd& v) noexcept {
    w.uint(static_cast<std::uint8_t>(v.valid() ? 1 : 0));
    if (v.valid()) w.fd = v.get();
  }
  static void get(Reader& r, Fd& v) noexcept {
    const std::uint8_t b = r.uint<std::uint8_t>();
    v.reset();
    if (b > 1 || (b == 1 && r.fd < 0)) r.ok = false;
    if (b == 1 && r.ok) {
      v.reset(r.fd);
      r.fd = -1;
    }
  }
};

template <typename Tag>
struct Codec<Ref<Tag>> {
  static constexpr std::size_t max_size = 4;
  static constexpr std::size_t fds = 0;
  static constexpr bool has_refs = true;
  static constexpr void feed(Fnv& h) noexcept { h.byte('r'); }
  static void put(Writer& w, const Ref<Tag>& v) noexcept { w.uint(v.value); }
  static void get(Reader& r, Ref<Tag>& v) noexcept { v.value = r.uint<std::uint32_t>(); }
  template <typename F>
  static void each_ref(Ref<Tag>& v, F& f) noexcept {
    f(v);
  }
};

template <typename L>
struct FieldCodecs;
template <typename... X>
struct FieldCodecs<TypeList<X...>> {
  static constexpr std::size_t max_size = (std::size_t{0} + ... + Codec<X>::max_size);
  static constexpr std::size_t fds = (std::size_t{0} + ... + Codec<X>::fds);
  static constexpr bool has_refs = (false || ... || Codec<X>::has_refs);
  static constexpr void feed(Fnv& h) noexcept { (Codec<X>::feed(h), ...); }
};

// A struct: its fields in order. Leaf types above are not aggregates.
template <typename T>
struct Codec<T, std::enable_if_t<std::is_class<T>::value && std::is_aggregate<T>::value>> {
  static_assert(!std::is_polymorphic<T>::value, "lemsg: a typed-interface struct cannot have virtual functions");
  using Fields = FieldsOf<T>;
  static constexpr std::size_t max_size = FieldCodecs<Fields>::max_size;
  static constexpr std::size_t fds = FieldCodecs<Fields>::fds;
  static constexpr bool has_refs = FieldCodecs<Fields>::has_refs;
  static constexpr void feed(Fnv& h) noexcept {
    h.byte('{');
    FieldCodecs<Fields>::feed(h);
    h.byte('}');
  }
  static void put(Writer& w, const T& v) noexcept {
    apply_fields(v, [&](const auto&... f) { (Codec<std::decay_t<decltype(f)>>::put(w, f), ...); });
  }
  static void get(Reader& r, T& v) noexcept {
    apply_fields(v, [&](auto&... f) { ((r.ok ? Codec<std::decay_t<decltype(f)>>::get(r, f) : void()), ...); });
  }
  template <typename F>
  static void each_ref(T& v, F& f) noexcept {
    apply_fields(v, [&](auto&... x) {
      (
          [&](auto& one) {
            using C = Codec<std::decay_t<decltype(one)>>;
            if constexpr (C::has_refs) C::each_ref(one, f);
          }(x),
          ...);
    });
  }
};

// One frame's payload: the item index (when `index` >= 0) and the value.
// The Fd, if any, is attached as a duplicate. Ok, or SystemError (dup),
// BadParameter (the fd is a directory), TooLarge (cannot happen when the
// pool holds the interface's max_payload).
template <typename T>
Result encode(Message& m, int index, const T& value) noexcept {
  unsigned char* p = static_cast<unsigned char*>(m.payload());
  Writer w{p, p + m.capacity()};
  if (index >= 0) w.uint(static_cast<std::uint8_t>(index));
  Codec<T>::put(w, value);
  if (!w.ok) return Result::TooLarge;
  Result r = m.set_size(static_cast<std::uint32_t>(w.p - p));
  if (r == Result::Ok && w.fd >= 0) {
    const int dup = ::fcntl(w.fd, F_DUPFD_CLOEXEC, 0);
    if (dup < 0) {
      LEMSG_LOG(Warning, "typed: cannot duplicate an Fd field's descriptor: %s", std::strerror(errno));
      return Result::SystemError;
    }
    r = m.set_fd(dup);
    if (r != Result::Ok) ::close(dup);
  }
  return r;
}

// Decodes the payload from byte `offset` into `value`, taking the frame's
// fd. False for anything malformed: the value is then reset, every fd closed.
template <typename T>
bool decode(Message& m, std::size_t offset, T& value) noexcept {
  const unsigned char* p = static_cast<const unsigned char*>(m.payload());
  Reader r{p + offset, p + m.size(), m.take_fd()};
  if (offset > m.size()) r.ok = false;
  if (r.ok) Codec<T>::get(r, value);
  if (r.ok && r.p != r.end) r.ok = false;  // trailing bytes
  if (r.fd >= 0) {
    ::close(r.fd);  // an fd nothing declared
    r.ok = false;
  }
  if (!r.ok) value = T{};
  return r.ok;
}

constexpr std::size_t cstr_len(const char* s) noexcept {
  std::size_t n = 0;
  while (s[n]) ++n;
  return n;
}

template <typename M, typename = void>
struct HasName : std::false_type {};
template <typename M>
struct HasName<M, std::void_t<decltype(M::name)>> : std::true_type {};

template <typename L>
struct ItemsInfo;
template <typename... Items>
struct ItemsInfo<TypeList<Items...>> {
  static_assert((HasName<Items>::value && ...),
                "lemsg: every item needs `static constexpr const char* name` (LEMSG_METHOD, LEMSG_ONEWAY and "
                "LEMSG_EVENT write it)");
  static_assert(((Codec<typename Items::Request>::fds <= 1 && Codec<typename Items::Response>::fds <= 1) && ...),
                "lemsg: at most one Fd per message");
  static constexpr std::size_t count = sizeof...(Items);
  static constexpr std::size_t max2(std::size_t a, std::size_t b) noexcept { return a > b ? a : b; }
  static constexpr std::size_t max_payload() noexcept {
    std::size_t m = 9;  // the subscription frame
    ((m = max2(m, 1 + Codec<typename Items::Request>::max_size)), ...);
    ((m = max2(m, Codec<typename Items::Response>::max_size)), ...);
    return m;
  }
  static constexpr std::uint64_t event_bits() noexcept {
    std::uint64_t bits = 0;
    std::size_t i = 0;
    ((bits |= (Items::kind == ItemKind::Event ? (std::uint64_t{1} << (i < 64 ? i : 0)) : 0), ++i), ...);
    return bits;
  }
  static constexpr std::size_t event_count() noexcept {
    return (std::size_t{0} + ... + (Items::kind == ItemKind::Event ? 1 : 0));
  }
  static constexpr bool events_first_64() noexcept {
    std::size_t i = 0;
    bool ok = true;
    ((ok = ok && (Items::kind != ItemKind::Event || i < 64), ++i), ...);
    return ok;
  }
  static constexpr void feed(Fnv& h) noexcept {
    ((h.byte(static_cast<std::uint8_t>(Items::kind)), h.str(Items::name), Codec<typename Items::Request>::feed(h),
      Codec<typename Items::Response>::feed(h)),
     ...);
  }
  template <typename M>
  static constexpr std::size_t index_of() noexcept {
    std::size_t i = 0, found = count;
    ((std::is_same<M, Items>::value ? (found = i, ++i) : ++i), ...);
    return found;
  }
};

struct IdText {
  char text[LEMSG_MAX_PROTOCOL_ID + 1] = {};
};

template <typename I>
constexpr std::uint64_t interface_hash() noexcept {
  Fnv h;
  h.str("lemsg.typed.1");
  h.str(I::name);
  ItemsInfo<typename I::ItemList>::feed(h);
  return h.v;
}

template <typename I>
constexpr IdText interface_id() noexcept {
  IdText id;
  std::size_t n = 0;
  for (const char* s = I::name; *s; ++s) id.text[n++] = *s;
  id.text[n++] = '#';
  const std::uint64_t h = interface_hash<I>();
  for (int i = 15; i >= 0; --i) id.text[n++] = "0123456789abcdef"[(h >> (4 * i)) & 0xf];
  return id;
}

// What the typed classes need of Message, Service and Session internals.
struct TypedAccess {
  static int fd_of(const Message& m) noexcept { return m.blk_ ? m.blk_->fd : -1; }
  static Service* service_of(const Message& m) noexcept {
    return m.blk_ && m.blk_->kind == MsgKind::Request ? static_cast<Service*>(m.blk_->service) : nullptr;
  }
  static bool close_peer(Service& s, SessionRef ref, Result why) noexcept { return s.close_peer(ref.value, why); }
  static Result respond_error(Service& s, Message&& m, Result code) noexcept { return s.respond_error(std::move(m), code); }
  static Result set_events(Service& s, SessionRef ref, std::uint64_t bits) noexcept { return s.set_events(ref, bits); }
  static std::size_t subscribers(const Service& s, std::uint64_t bit, SessionRef* out) noexcept {
    return s.subscribers(bit, out);
  }
  static void set_open_hook(Session& s, void (*hook)(void*) noexcept, void* ctx) noexcept {
    s.opened_hook_ = hook;
    s.opened_ctx_ = ctx;
  }
  static void drop_server(Session& s, Result why) noexcept { s.drop_server(why); }
  static const char* name(const Session& s) noexcept { return s.name_ ? s.name_ : s.protocol_.id; }
  static const char* name(const Service& s) noexcept { return s.log_name(); }
};

constexpr std::uint8_t subscribe_index = 0xFF;

}  // namespace detail

template <typename I>
struct InterfaceInfo {
 private:
  using Items = detail::ItemsInfo<typename I::ItemList>;
  static_assert(detail::cstr_len(I::name) >= 1 && detail::cstr_len(I::name) + 17 <= LEMSG_MAX_PROTOCOL_ID,
                "lemsg: an interface name is 1..LEMSG_MAX_PROTOCOL_ID - 17 characters");
  static_assert(Items::events_first_64(), "lemsg: events must be among an interface's first 64 items");

 public:
  /// The declaration's hash, and the protocol id "<name>#<hash in hex>".
  static constexpr std::uint64_t hash = detail::interface_hash<I>();
  static constexpr detail::IdText id = detail::interface_id<I>();
  /// The largest payload of any frame of this interface.
  static constexpr std::uint32_t max_payload = static_cast<std::uint32_t>(Items::max_payload());
  static_assert(Items::max_payload() <= (std::size_t{1} << 24), "lemsg: an interface's largest frame is above 16 MiB");
  static constexpr std::size_t item_count = Items::count;
  /// Bit i is set when item i is an event.
  static constexpr std::uint64_t event_bits = Items::event_bits();
  /// Item M's index (a compile-time error when M is not an item of I).
  template <typename M>
  static constexpr std::size_t index_of = Items::template index_of<M>();
  static Protocol protocol() noexcept { return Protocol{id.text, max_payload}; }
};

/// The largest encoding of a field type, and the encoding of one value.
template <typename T>
constexpr std::size_t max_encoded_size() noexcept {
  return detail::Codec<T>::max_size;
}

// ---- Responder

template <typename M>
Result Responder<M>::credentials(Credentials& out) const noexcept {
  Service* svc = detail::TypedAccess::service_of(msg_);
  if (!svc) return Result::Closed;
  return svc->credentials(msg_.session(), out) == Result::Ok ? Result::Ok : Result::Closed;
}

template <typename M>
Result Responder<M>::reply(const typename M::Response& resp) noexcept {
  if (!msg_.needs_response()) return Result::BadParameter;
  Service* svc = detail::TypedAccess::service_of(msg_);
  if (!svc) {
    msg_.release();
    return Result::Closed;
  }
  const Result r = detail::encode(msg_, -1, resp);
  if (r != Result::Ok) {
    // The client still hears of it: its call completes with the reason.
    (void)detail::TypedAccess::respond_error(*svc, std::move(msg_), r);
    return r;
  }
  return svc->respond(std::move(msg_));
}

template <typename M>
Result Responder<M>::fail(Result code) noexcept {
  if (code == Result::Ok || !msg_.needs_response()) return Result::BadParameter;
  Service* svc = detail::TypedAccess::service_of(msg_);
  if (!svc) {
    msg_.release();
    return Result::Closed;
  }
  return detail::TypedAccess::respond_error(*svc, std::move(msg_), code);
}

// ---- TypedService

template <typename I>
TypedService<I>::TypedService(Loop& loop, MessagePoolBase& pool) noexcept : svc_(loop, Info::protocol(), pool) {
  svc_.set_receive_handler([this](Message& m) { on_frame(m); });
}

template <typename I>
template <typename M, typename F>
void TypedService<I>::set_handler(F&& f) noexcept {
  constexpr std::size_t k = Info::template index_of<M>;
  static_assert(k < Info::item_count, "lemsg: set_handler<M>: M is not an item of this interface");
  static_assert(M::kind != ItemKind::Event, "lemsg: set_handler<M>: M is an event (the server emits it)");
  detail::slot_at<k>(handlers_) = detail::ServerHandlerOf<M>(std::forward<F>(f));
}

template <typename I>
bool TypedService<I>::refuse_frame(SessionRef s, const char* why) noexcept {
  LEMSG_LOG(Warning, "service %s: a client sent a bad typed frame (%s); closing its session: BadFrame",
            detail::TypedAccess::name(svc_), why);
  return detail::TypedAccess::close_peer(svc_, s, Result::BadFrame);
}

template <typename I>
void TypedService<I>::on_frame(Message& m) noexcept {
  const SessionRef s = m.session();
  const bool request = m.needs_response();
  const unsigned char* p = static_cast<const unsigned char*>(m.payload());
  if (m.size() < 1) {
    (void)refuse_frame(s, "empty payload");
    return;
  }
  if (p[0] == detail::subscribe_index) {
    std::uint64_t bits = 0;
    if (request || m.size() != 9 || m.has_fd()) {
      (void)refuse_frame(s, "malformed subscription");
      return;
    }
    std::memcpy(&bits, p + 1, 8);
#if !(defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__)
    bits = __builtin_bswap64(bits);
#endif
    if (bits & ~Info::event_bits) {
      (void)refuse_frame(s, "subscription to an item that is not an event");
      return;
    }
    (void)detail::TypedAccess::set_events(svc_, s, bits);
    return;
  }
  if (p[0] >= Info::item_count) {
    (void)refuse_frame(s, "unknown item index");
    return;
  }
  dispatch_index(p[0], m, request, std::make_index_sequence<Info::item_count>{});
}

template <typename I>
template <std::size_t... K>
void TypedService<I>::dispatch_index(std::size_t index, Message& m, bool request,
                                     std::index_sequence<K...>) noexcept {
  (void)((index == K ? (dispatch<K>(m, request), true) : false) || ...);
}

template <typename I>
template <std::size_t K>
void TypedService<I>::dispatch(Message& m, bool request) noexcept {
  using M = detail::TypeAt<K, typename I::ItemList>;
  const SessionRef s = m.session();
  if constexpr (M::kind == ItemKind::Event) {
    (void)request;
    (void)refuse_frame(s, "an event sent by a client");
  } else {
    if (request != (M::kind == ItemKind::Method)) {
      (void)refuse_frame(s, request ? "a one-way item sent as a request" : "a method sent without a response");
      return;
    }
    typename M::Request req{};
    if (!detail::decode(m, 1, req)) {
      (void)refuse_frame(s, M::name);
      return;
    }
    if constexpr (detail::Codec<typename M::Request>::has_refs) {
      if (!refs_resolve(s, req)) {
        LEMSG_LOG(Warning, "service %s: %s names an object that is not this session's: BadReference",
                  detail::TypedAccess::name(svc_), M::name);
        if constexpr (M::kind == ItemKind::Method)
          (void)detail::TypedAccess::respond_error(svc_, std::move(m), Result::BadReference);
        return;
      }
    }
    // A copy: the handler may replace itself (or destroy this service).
    auto h = detail::slot_at<K>(handlers_);
    if (!h) {
      LEMSG_LOG(Debug, "service %s: no handler for %s", detail::TypedAccess::name(svc_), M::name);
      return;
    }
    if constexpr (M::kind == ItemKind::Method) {
      Responder<M> r(std::move(m));
      h(r, req);
    } else {
      const Caller c{s};
      h(c, req);
    }
  }
}

template <typename I>
template <typename E>
Result TypedService<I>::emit(const typename E::Request& event) noexcept {
  constexpr std::size_t k = Info::template index_of<E>;
  static_assert(k < Info::item_count && E::kind == ItemKind::Event, "lemsg: emit<E>: E is not an event of this interface");
  SessionRef to[LEMSG_MAX_SESSIONS];
  const std::size_t n = detail::TypedAccess::subscribers(svc_, std::uint64_t{1} << k, to);
  if (n == 0) return Result::Ok;
  Message first;
  Result r = svc_.create_message(first);
  if (r == Result::Ok) r = detail::encode(first, static_cast<int>(k), event);
  if (r != Result::Ok) return r;
  Result worst = Result::Ok;
  for (std::size_t i = 0; i < n; ++i) {
    Message m;
    if (i + 1 == n) {
      m = std::move(first);  // the last subscriber gets the encoded block itself
      r = Result::Ok;
    } else {
      r = svc_.create_message(m);
      if (r == Result::Ok) r = m.assign(first.payload(), first.size());
      if (r == Result::Ok && first.has_fd()) {
        // Each subscriber's message closes its own descriptor once sent.
        const int dup = ::fcntl(detail::TypedAccess::fd_of(first), F_DUPFD_CLOEXEC, 0);
        r = dup < 0 ? Result::SystemError : m.set_fd(dup);
        if (r != Result::Ok && dup >= 0) ::close(dup);
      }
    }
    if (r == Result::Ok) r = svc_.send(to[i], std::move(m));
    if (r == Result::Overflow) {
      LEMSG_LOG(Warning, "service %s: a subscriber does not read its events; closing its session: Overflow",
                detail::TypedAccess::name(svc_));
      if (!detail::TypedAccess::close_peer(svc_, to[i], Result::Overflow)) return r;
    }
    if (r != Result::Ok && worst == Result::Ok) worst = r;
  }
  return worst;
}

template <typename I>
template <typename E>
std::size_t TypedService<I>::subscriber_count() const noexcept {
  constexpr std::size_t k = Info::template index_of<E>;
  static_assert(k < Info::item_count && E::kind == ItemKind::Event, "lemsg: E is not an event of this interface");
  return detail::TypedAccess::subscribers(svc_, std::uint64_t{1} << k, nullptr);
}

namespace detail {
template <typename Tag>
struct TagKey {
  static constexpr char key = 0;
};
}  // namespace detail

template <typename I>
template <typename Tag>
RefMapBase* TypedService<I>::map_for() const noexcept {
  for (const Binding& b : refs_)
    if (b.tag == &detail::TagKey<Tag>::key) return b.map;
  return nullptr;
}

template <typename I>
template <typename Tag>
Result TypedService<I>::bind_refs(RefMapBase& map, TrackRelease release) noexcept {
  if (map_for<Tag>()) return Result::Duplicate;
  for (Binding& b : refs_) {
    if (b.tag) continue;
    // Without a release function the entries are just removed.
    if (!release) release = [](void*, std::uint32_t) {};
    const Result r = svc_.track(map, std::move(release));
    if (r != Result::Ok) return r;
    b.tag = &detail::TagKey<Tag>::key;
    b.map = &map;
    return Result::Ok;
  }
  return Result::TrackTableFull;
}

template <typename I>
template <typename Tag>
Result TypedService<I>::make_ref(SessionRef s, Tag* obj, Ref<Tag>& out) noexcept {
  out = Ref<Tag>{};
  RefMapBase* map = map_for<Tag>();
  Credentials c;
  if (!map || svc_.credentials(s, c) != Result::Ok) return Result::NotFound;
  return map->add_ptr(obj, out.value, s.value);
}

template <typename I>
template <typename Tag>
Tag* TypedService<I>::object(Ref<Tag> ref) const noexcept {
  RefMapBase* map = map_for<Tag>();
  return map ? static_cast<Tag*>(map->lookup_ptr(ref.value)) : nullptr;
}

template <typename I>
template <typename Tag>
Result TypedService<I>::drop_ref(Ref<Tag> ref) noexcept {
  RefMapBase* map = map_for<Tag>();
  return map ? map->remove(ref.value) : Result::NotFound;
}

template <typename I>
template <typename T>
bool TypedService<I>::refs_resolve(SessionRef s, T& value) const noexcept {
  bool ok = true;
  auto check = [&](auto& ref) {
    using Tag = typename std::decay_t<decltype(ref)>::TagType;
    const RefMapBase* map = map_for<Tag>();
    if (!map || !map->lookup_ptr(ref.value) || map->owner_of(ref.value) != s.value) ok = false;
  };
  detail::Codec<T>::each_ref(value, check);
  return ok;
}

// ---- TypedClient

template <typename I>
TypedClient<I>::TypedClient(Loop& loop, MessagePoolBase& pool) noexcept : session_(loop, Info::protocol(), pool) {
  session_.set_receive_handler([this](Message& m) { on_event(m); });
  detail::TypedAccess::set_open_hook(session_, &TypedClient::opened, this);
}

template <typename I>
void TypedClient<I>::opened(void* self) noexcept {
  TypedClient* c = static_cast<TypedClient*>(self);
  if (!c->subscribed_) return;
  const Result r = c->send_subscriptions(c->subscribed_);
  if (r != Result::Ok)
    LEMSG_LOG(Warning, "session %s: could not send the event subscriptions again: %s",
              detail::TypedAccess::name(c->session_), to_string(r));
}

template <typename I>
Result TypedClient<I>::send_subscriptions(std::uint64_t bits) noexcept {
  Message m;
  Result r = session_.create_message(m);
  if (r != Result::Ok) return r;
  // Built on the stack and copied in: g++ -O1 for mips takes a constant-size
  // memcpy into the payload (which lies past the block's header) for a write
  // out of bounds (-Warray-bounds).
  unsigned char frame[9];
  frame[0] = detail::subscribe_index;
#if !(defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__)
  bits = __builtin_bswap64(bits);
#endif
  std::memcpy(frame + 1, &bits, 8);
  r = m.assign(frame, sizeof frame);
  if (r == Result::Ok) r = session_.send(std::move(m));
  return r;
}

template <typename I>
template <typename M>
Result TypedClient<I>::encode_request(const typename M::Request& req, Message& out) noexcept {
  constexpr std::size_t k = Info::template index_of<M>;
  static_assert(k < Info::item_count, "lemsg: M is not an item of this interface");
  Result r = session_.create_message(out);
  if (r == Result::Ok) r = detail::encode(out, static_cast<int>(k), req);
  return r;
}

template <typename I>
template <typename M>
Result TypedClient<I>::call(const typename M::Request& req, typename M::Response& resp, int timeout_ms) noexcept {
  static_assert(M::kind == ItemKind::Method, "lemsg: call<M>: M is not a method (send<M> for a one-way item)");
  Message m, answer;
  Result r = encode_request<M>(req, m);
  if (r == Result::Ok) r = session_.request_sync(std::move(m), answer, timeout_ms);
  if (r != Result::Ok) {
    resp = typename M::Response{};
  } else if (!detail::decode(answer, 0, resp)) {  // which resets resp
    refuse_frame(M::name);
    r = Result::BadFrame;
  }
  return r;
}

template <typename I>
template <typename M, typename F>
Result TypedClient<I>::call_async(const typename M::Request& req, F&& done, std::uint32_t timeout_ms) noexcept {
  static_assert(M::kind == ItemKind::Method, "lemsg: call_async<M>: M is not a method");
  static_assert(std::is_invocable<std::decay_t<F>&, Result, typename M::Response&>::value,
                "lemsg: call_async<M>: done must be callable as done(Result, Response&)");
  Message m;
  Result r = encode_request<M>(req, m);
  if (r != Result::Ok) return r;
  return session_.request(
      std::move(m),
      [self = this, f = std::forward<F>(done)](Result why, Message& answer) mutable {
        typename M::Response resp{};
        if (why == Result::Ok && !detail::decode(answer, 0, resp)) {
          self->refuse_frame(M::name);
          why = Result::BadFrame;
        }
        f(why, resp);
      },
      timeout_ms);
}

template <typename I>
template <typename M>
Result TypedClient<I>::send(const typename M::Request& req) noexcept {
  static_assert(M::kind == ItemKind::OneWay, "lemsg: send<M>: M is not a one-way item");
  Message m;
  Result r = encode_request<M>(req, m);
  if (r == Result::Ok) r = session_.send(std::move(m));
  return r;
}

template <typename I>
template <typename E, typename F>
Result TypedClient<I>::subscribe(F&& handler) noexcept {
  constexpr std::size_t k = Info::template index_of<E>;
  static_assert(k < Info::item_count && E::kind == ItemKind::Event, "lemsg: subscribe<E>: E is not an event");
  const std::uint64_t bits = subscribed_ | (std::uint64_t{1} << k);
  if (session_.is_open() && bits != subscribed_) {
    const Result r = send_subscriptions(bits);
    if (r != Result::Ok) return r;
  }
  detail::slot_at<k>(handlers_) = EventHandler<E>(std::forward<F>(handler));
  subscribed_ = bits;
  return Result::Ok;
}

template <typename I>
template <typename E>
Result TypedClient<I>::unsubscribe() noexcept {
  constexpr std::size_t k = Info::template index_of<E>;
  static_assert(k < Info::item_count && E::kind == ItemKind::Event, "lemsg: unsubscribe<E>: E is not an event");
  const std::uint64_t bits = subscribed_ & ~(std::uint64_t{1} << k);
  if (session_.is_open() && bits != subscribed_) {
    const Result r = send_subscriptions(bits);
    if (r != Result::Ok) return r;
  }
  subscribed_ = bits;
  detail::slot_at<k>(handlers_) = nullptr;
  return Result::Ok;
}

template <typename I>
void TypedClient<I>::refuse_frame(const char* why) noexcept {
  LEMSG_LOG(Warning, "session %s: the server sent a bad typed frame (%s); closing: BadFrame",
            detail::TypedAccess::name(session_), why);
  detail::TypedAccess::drop_server(session_, Result::BadFrame);
}

template <typename I>
void TypedClient<I>::on_event(Message& m) noexcept {
  const unsigned char* p = static_cast<const unsigned char*>(m.payload());
  if (m.size() < 1 || p[0] >= Info::item_count) {
    refuse_frame("unknown item index");
    return;
  }
  event_index(p[0], m, std::make_index_sequence<Info::item_count>{});
}

template <typename I>
template <std::size_t... K>
void TypedClient<I>::event_index(std::size_t index, Message& m, std::index_sequence<K...>) noexcept {
  (void)((index == K ? (deliver_event<K>(m), true) : false) || ...);
}

template <typename I>
template <std::size_t K>
void TypedClient<I>::deliver_event(Message& m) noexcept {
  using M = detail::TypeAt<K, typename I::ItemList>;
  if constexpr (M::kind != ItemKind::Event) {
    (void)m;
    refuse_frame("a message that is not an event");
  } else {
    typename M::Request ev{};
    if (!detail::decode(m, 1, ev)) {
      refuse_frame(M::name);
      return;
    }
    // Not subscribed (any more): an event sent before the server heard so.
    if (!((subscribed_ >> K) & 1u)) return;
    EventHandler<M> h = detail::slot_at<K>(handlers_);  // a copy: it may unsubscribe itself
    if (h) h(ev);
  }
}

}  // namespace lemsg

// =============================================================================
// 13. Service directory                                            >>directory
// =============================================================================
//
// Directory mode, and the ways to look at a running system. In order:
//   - Bindings: the bindings file and its parser (class Bindings), and user
//     names from the passwd file.
//   - Introspection: the info query every Service answers (query_info,
//     ServiceInfo) and the monitor (Monitor, MonitorRecord).
//   - Directory mode: the protocol between servers, clients and the daemon;
//     the tools' calls (directory_list, directory_wait, directory_connect);
//     the daemon itself (class Directory, run by examples/lemsg-dir.cpp).
// The Service and Session sides of directory mode are in sections 10 and 11
// (advertise, set_discovery); Discovery and LEMSG_DIRECTORY in section 7.

namespace lemsg {

// ---- Bindings: who reaches which service through the directory
//
// A client asks the directory for an interface by its own name ("modem");
// the directory finds the binding by the client's uid and hands it the
// server's socket. The bindings come from a plain-text file (the daemon's
// default is /etc/lemsg/bindings), one binding per line:
//
//     # client.interface  ->  server.service
//     ui.modem     -> modem.modem
//     logger.modem -> modem.modem
//     1003.log->logger.log        # blanks around the arrow are optional
//
//   - CLIENT and SERVER are users: a decimal uid (digits only, no sign, less
//     than (uid_t)-1, which means "no uid") or a user name found in the
//     passwd file (below). The user ends at the first '.', so a user whose
//     name holds a '.' is written as its uid.
//   - INTERFACE and SERVICE are names as services have them: 1 to
//     LEMSG_MAX_NAME characters of [A-Za-z0-9._-], not starting with '.'.
//   - '#' starts a comment anywhere on a line; blank lines, leading and
//     trailing blanks and CRLF line ends are ignored.
//   - One client uid binds one interface once: a second line with the same
//     client uid and interface is an error, whether the user is written as a
//     name or as a uid. Several clients may reach one service.
//   - At most LEMSG_DIR_MAX_BINDINGS bindings (more: BindingTableFull, at the
//     first line that does not fit) in a file of at most
//     LEMSG_DIR_MAX_BINDINGS_FILE bytes (default 64 KiB).
//
// Errors name the file and the line, as a compiler does:
//     bindings:7: unknown user 'ui' (not in /etc/passwd) (and 2 more errors)
// Parsing goes on to the end of the file so that the count is right; only
// the first error is spelled out. `lemsg-dir --check FILE` prints it.
//
// All or nothing: parse() and load() replace the table only when the whole
// file is good. A bad file leaves the table exactly as it was, so a daemon
// that reloads a broken file keeps serving the bindings it had.
//
// User names are resolved by reading the passwd file directly (name:pw:uid:
// ..., first match wins), not through NSS: no heap, no shared modules, the
// same answer in a chroot or under qemu-user. The file is /etc/passwd, or
// $LEMSG_PASSWD when set and not empty (tests; systems that keep it
// elsewhere). Users known only to LDAP or another NSS source are written as
// uids. Names are resolved when the file is parsed: after renumbering a user,
// reload.

/// One line of a bindings file: the client with uid `client_uid` asking for
/// `iface` reaches service `service` of the server running as `server_uid`.
/// `line` is where it was written (1-based), for messages.
struct Binding {
  uid_t client_uid;
  char iface[LEMSG_MAX_NAME + 1];
  uid_t server_uid;
  char service[LEMSG_MAX_NAME + 1];
  std::uint32_t line;
};

/// The bindings table: at most LEMSG_DIR_MAX_BINDINGS entries, filled from a
/// bindings file's text (parse) or the file itself (load), all or nothing.
/// Fixed storage, no heap: two tables (the one in use and the one being
/// parsed) plus LEMSG_DIR_MAX_BINDINGS_FILE bytes for load(), about 100 KiB
/// with the defaults, so keep it static or in a long-lived object rather
/// than on a small thread stack. Not thread-safe: it belongs to one thread.
class Bindings {
 public:
  Bindings() noexcept = default;
  Bindings(const Bindings&) = delete;
  Bindings& operator=(const Bindings&) = delete;

  /// Replaces the table with the bindings in `text` (`len` bytes, need not
  /// end in a NUL), or changes nothing on any error. On error `err` (when
  /// not null, `err_len` bytes, always NUL-terminated) gets
  /// "FILE:LINE: what is wrong" for the first error, with
  /// " (and N more errors)" when there are more; `file_name` is only for
  /// the messages (nullptr: "bindings"). On Ok `err` is an empty string.
  /// Ok; BadParameter (syntax, names, unknown user, uid out of range, a
  /// client and interface bound twice; `text` null with `len` > 0);
  /// BindingTableFull (more than LEMSG_DIR_MAX_BINDINGS bindings). The
  /// Result is the first error's.
  Result parse(const char* text, std::size_t len, const char* file_name, char* err,
               std::size_t err_len) noexcept;

  /// Reads the file `path` (open/read, at most LEMSG_DIR_MAX_BINDINGS_FILE
  /// bytes) and parses it, all or nothing; messages as parse(), with `path`
  /// as the file name, and for the file itself "FILE: cannot open: <why>".
  /// Ok; NotFound (no such file); BadParameter (not a regular file, larger
  /// than LEMSG_DIR_MAX_BINDINGS_FILE, or any parse error); BindingTableFull;
  /// SystemError (cannot open or read it for another reason).
  Result load(const char* path, char* err, std::size_t err_len) noexcept;

  /// The binding of client uid `client` for interface `iface`, or nullptr.
  /// Valid until the next successful parse() or load().
  const Binding* find(uid_t client, const char* iface) const noexcept;

  /// How many bindings the table holds.
  std::size_t size() const noexcept { return count_[active_]; }

  /// Binding `i`, in file order; `i` < size().
  const Binding& operator[](std::size_t i) const noexcept {
    LEMSG_ASSERT(i < count_[active_]);
    return table_[active_][i];
  }

 private:
  Binding table_[2][LEMSG_DIR_MAX_BINDINGS] = {};
  std::size_t count_[2] = {0, 0};
  unsigned active_ = 0;
  char file_[LEMSG_DIR_MAX_BINDINGS_FILE] = {};
};

namespace detail {

/// The passwd file user names are looked up in: $LEMSG_PASSWD if set and
/// not empty, else /etc/passwd. Read at each call.
inline const char* passwd_path() noexcept;

/// The uid of user `name` in the passwd file (first match). False when the
/// file has no such user or cannot be read. No NSS, no heap.
inline bool lookup_user(const char* name, uid_t& uid) noexcept;

/// The name of the first user with `uid` in the passwd file, into `out`
/// (`len` bytes, NUL-terminated). False when there is none, the file cannot
/// be read, or the name does not fit.
inline bool user_name(uid_t uid, char* out, std::size_t len) noexcept;

}  // namespace detail

// -- implementation (bindings) --

namespace detail {

inline const char* passwd_path() noexcept {
  const char* p = std::getenv("LEMSG_PASSWD");
  return (p && *p) ? p : "/etc/passwd";
}

/// What scan_passwd found.
enum class PasswdScan { Found, Missing, Unreadable };

/// Calls `match(name, name_len, uid)` for each entry of the passwd file,
/// until it returns true (Found). Reads through a small stack buffer; of a
/// line only its first 256 bytes are kept, which hold the name and the uid
/// of any sane entry (a longer line whose uid falls beyond them is
/// skipped). Entries with an empty name, a NIS "+"/"-" name, a uid that
/// is not a number or a uid of (uid_t)-1 ("no uid", never a user: the
/// bindings refuse it written as a number too) are skipped.
template <typename F>
PasswdScan scan_passwd(F&& match) noexcept {
  int fd;
  do {
    fd = ::open(passwd_path(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) return PasswdScan::Unreadable;
  char chunk[512];
  char line[256];
  std::size_t n = 0;  // bytes of the line kept (at most sizeof line)
  // One entry, from the kept prefix of its line: name, password, uid.
  auto entry = [&]() -> bool {
    const char* colon1 = static_cast<const char*>(std::memchr(line, ':', n));
    if (colon1 == nullptr || colon1 == line || line[0] == '+' || line[0] == '-') return false;
    const std::size_t rest = n - static_cast<std::size_t>(colon1 + 1 - line);
    const char* colon2 = static_cast<const char*>(std::memchr(colon1 + 1, ':', rest));
    if (colon2 == nullptr) return false;
    const char* u = colon2 + 1;
    const char* end = line + n;
    std::uint64_t v = 0;
    const char* p = u;
    for (; p < end && *p >= '0' && *p <= '9'; ++p) {
      v = v * 10u + static_cast<std::uint64_t>(*p - '0');
      if (v >= std::numeric_limits<uid_t>::max()) return false;
    }
    // The uid field must be whole: digits, then the next ':'.
    if (p == u || p == end || *p != ':') return false;
    return match(line, static_cast<std::size_t>(colon1 - line), static_cast<uid_t>(v));
  };
  PasswdScan found = PasswdScan::Missing;
  for (;;) {
    const ssize_t got = ::read(fd, chunk, sizeof chunk);
    if (got < 0) {
      if (errno == EINTR) continue;
      found = PasswdScan::Unreadable;
      break;
    }
    if (got == 0) {
      if (n > 0 && entry()) found = PasswdScan::Found;  // a last line without '\n'
      break;
    }
    for (ssize_t i = 0; i < got; ++i) {
      const char c = chunk[i];
      if (c == '\n') {
        if (n > 0 && entry()) {
          found = PasswdScan::Found;
          break;
        }
        n = 0;
      } else if (n < sizeof line) {
        line[n++] = c;
      }
    }
    if (found == PasswdScan::Found) break;
  }
  ::close(fd);
  return found;
}

inline PasswdScan find_user(const char* name, std::size_t len, uid_t& uid) noexcept {
  return scan_passwd([&](const char* n, std::size_t nlen, uid_t u) {
    if (nlen != len || std::memcmp(n, name, len) != 0) return false;
    uid = u;
    return true;
  });
}

inline bool lookup_user(const char* name, uid_t& uid) noexcept {
  if (name == nullptr || name[0] == '\0') return false;
  return find_user(name, std::strlen(name), uid) == PasswdScan::Found;
}

inline bool user_name(uid_t uid, char* out, std::size_t len) noexcept {
  if (out == nullptr || len == 0) return false;
  out[0] = '\0';
  bool fits = false;
  const PasswdScan r = scan_passwd([&](const char* n, std::size_t nlen, uid_t u) {
    if (u != uid) return false;
    fits = nlen < len;
    if (fits) {
      std::memcpy(out, n, nlen);
      out[nlen] = '\0';
    }
    return true;
  });
  return r == PasswdScan::Found && fits;
}

namespace bindfile {

/// The first error of a bindings file and how many there were.
struct BindingErrors {
  char* out;
  std::size_t out_len;
  const char* file;
  std::size_t count = 0;
  Result first = Result::Ok;

  /// Records an error at `line`; only the first is written out.
  __attribute__((format(printf, 4, 5))) void add(Result r, std::uint32_t line, const char* fmt, ...) noexcept {
    if (count++ != 0) return;
    first = r;
    if (out == nullptr || out_len == 0) return;
    int w = std::snprintf(out, out_len, "%s:%lu: ", file, static_cast<unsigned long>(line));
    if (w < 0 || static_cast<std::size_t>(w) >= out_len) return;
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(out + w, out_len - static_cast<std::size_t>(w), fmt, ap);
    va_end(ap);
  }

  /// Appends "(and N more errors)" when there were more than one.
  void finish() noexcept {
    if (count < 2 || out == nullptr || out_len == 0) return;
    const std::size_t used = std::strlen(out);
    if (used + 1 >= out_len) return;
    std::snprintf(out + used, out_len - used, " (and %lu more error%s)", static_cast<unsigned long>(count - 1),
                  count == 2 ? "" : "s");
  }
};

/// A piece of a line: `p`, `n` bytes (not NUL-terminated).
struct Span {
  const char* p;
  std::size_t n;
};

inline bool is_blank(char c) noexcept { return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f'; }

inline Span trim(Span s) noexcept {
  while (s.n > 0 && is_blank(s.p[0])) {
    ++s.p;
    --s.n;
  }
  while (s.n > 0 && is_blank(s.p[s.n - 1])) --s.n;
  return s;
}

inline bool is_name_char(char c) noexcept {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
         c == '-';
}

/// Prints at most 32 bytes of `s` for a message, non-printing bytes as '?'.
struct Quoted {
  char text[36];
  explicit Quoted(Span s) noexcept {
    const std::size_t k = s.n < 32 ? s.n : 32;
    for (std::size_t i = 0; i < k; ++i) {
      const unsigned char c = static_cast<unsigned char>(s.p[i]);
      text[i] = (c >= 0x20 && c < 0x7f) ? static_cast<char>(c) : '?';
    }
    std::size_t e = k;
    if (k < s.n) {
      text[e++] = '.';
      text[e++] = '.';
      text[e++] = '.';
    }
    text[e] = '\0';
  }
};

/// One side of a binding, "USER.NAME": the uid and the name (copied into
/// `name`, NUL-terminated), or false with the error recorded. `what` is
/// "client"/"server", `name_what` "interface"/"service".
inline bool parse_endpoint(Span s, std::uint32_t line, const char* what, const char* name_what, uid_t& uid,
                           char (&name)[LEMSG_MAX_NAME + 1], BindingErrors& errors) noexcept {
  const char* dot = static_cast<const char*>(std::memchr(s.p, '.', s.n));
  if (dot == nullptr) {
    errors.add(Result::BadParameter, line, "'%s': the %s is USER.%s, with a '.' after the user",
               Quoted(s).text, what, name_what);
    return false;
  }
  const Span user{s.p, static_cast<std::size_t>(dot - s.p)};
  const Span nm{dot + 1, s.n - user.n - 1};
  if (user.n == 0) {
    errors.add(Result::BadParameter, line, "'%s': no %s user before the '.'", Quoted(s).text, what);
    return false;
  }
  if (nm.n == 0) {
    errors.add(Result::BadParameter, line, "'%s': no %s name after the '.'", Quoted(s).text, name_what);
    return false;
  }
  // The name: the library's service-name rule (socket_path).
  if (nm.p[0] == '.') {
    errors.add(Result::BadParameter, line, "%s name '%s' starts with '.'", name_what, Quoted(nm).text);
    return false;
  }
  for (std::size_t i = 0; i < nm.n; ++i) {
    if (!is_name_char(nm.p[i])) {
      const Span bad{nm.p + i, 1};
      errors.add(Result::BadParameter, line, "%s name '%s': character '%s' is not one of [A-Za-z0-9._-]",
                 name_what, Quoted(nm).text, Quoted(bad).text);
      return false;
    }
  }
  if (nm.n > LEMSG_MAX_NAME) {
    errors.add(Result::BadParameter, line, "%s name '%s' is longer than LEMSG_MAX_NAME (%d characters)",
               name_what, Quoted(nm).text, LEMSG_MAX_NAME);
    return false;
  }
  // The user: all digits is a uid, anything else a user name.
  bool digits = true;
  for (std::size_t i = 0; i < user.n; ++i) digits = digits && user.p[i] >= '0' && user.p[i] <= '9';
  if (digits) {
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < user.n && v < std::numeric_limits<uid_t>::max(); ++i)
      v = v * 10u + static_cast<std::uint64_t>(user.p[i] - '0');
    // (uid_t)-1 is "no uid" (chown's "leave it"), never a real user.
    if (v >= std::numeric_limits<uid_t>::max()) {
      errors.add(Result::BadParameter, line, "%s uid %s is out of range (at most %lu)", what,
                 Quoted(user).text, static_cast<unsigned long>(std::numeric_limits<uid_t>::max() - 1u));
      return false;
    }
    uid = static_cast<uid_t>(v);
  } else {
    for (std::size_t i = 0; i < user.n; ++i) {
      if (is_blank(user.p[i]) || user.p[i] == ':') {
        const Span bad{user.p + i, 1};
        errors.add(Result::BadParameter, line, "%s user '%s': character '%s' is not allowed in a user name",
                   what, Quoted(user).text, Quoted(bad).text);
        return false;
      }
    }
    const PasswdScan r = find_user(user.p, user.n, uid);
    if (r != PasswdScan::Found) {
      errors.add(Result::BadParameter, line, "unknown %s user '%s' (%s %s)", what, Quoted(user).text,
                 r == PasswdScan::Missing ? "not in" : "cannot read", passwd_path());
      return false;
    }
  }
  std::memcpy(name, nm.p, nm.n);
  name[nm.n] = '\0';
  return true;
}

}  // namespace bindfile
}  // namespace detail

inline Result Bindings::parse(const char* text, std::size_t len, const char* file_name, char* err,
                              std::size_t err_len) noexcept {
  namespace bf = detail::bindfile;
  if (err != nullptr && err_len > 0) err[0] = '\0';
  bf::BindingErrors errors{err, err_len, file_name != nullptr ? file_name : "bindings"};
  if (text == nullptr && len > 0) {
    errors.add(Result::BadParameter, 0, "no text");
    return Result::BadParameter;
  }
  // Parse into the table not in use; it becomes the table only when all is well.
  const unsigned next = active_ ^ 1u;
  Binding* out = table_[next];
  std::size_t count = 0;
  bool full = false;
  std::uint32_t line = 0;
  std::size_t pos = 0;
  while (pos < len) {
    ++line;
    const char* start = text + pos;
    const char* nl = static_cast<const char*>(std::memchr(start, '\n', len - pos));
    const std::size_t line_len = nl != nullptr ? static_cast<std::size_t>(nl - start) : len - pos;
    pos += line_len + 1;
    const char* hash = static_cast<const char*>(std::memchr(start, '#', line_len));
    const bf::Span s = bf::trim({start, hash != nullptr ? static_cast<std::size_t>(hash - start) : line_len});
    if (s.n == 0) continue;

    const char* arrow = nullptr;
    for (std::size_t i = 0; i + 1 < s.n; ++i) {
      if (s.p[i] == '-' && s.p[i + 1] == '>') {
        arrow = s.p + i;
        break;
      }
    }
    if (arrow == nullptr) {
      errors.add(Result::BadParameter, line, "no '->' in '%s' (CLIENT.INTERFACE -> SERVER.SERVICE)",
                 bf::Quoted(s).text);
      continue;
    }
    const bf::Span left = bf::trim({s.p, static_cast<std::size_t>(arrow - s.p)});
    const bf::Span right = bf::trim({arrow + 2, s.n - static_cast<std::size_t>(arrow + 2 - s.p)});
    if (left.n == 0 || right.n == 0) {
      errors.add(Result::BadParameter, line, "'%s': %s missing (CLIENT.INTERFACE -> SERVER.SERVICE)",
                 bf::Quoted(s).text, left.n == 0 ? "the client is" : "the server is");
      continue;
    }
    // One word each side: blanks inside one mean a stray word.
    const bf::Span* sides[2] = {&left, &right};
    bool stray = false;
    for (const bf::Span* side : sides) {
      for (std::size_t i = 0; i < side->n && !stray; ++i) {
        if (bf::is_blank(side->p[i])) {
          errors.add(Result::BadParameter, line, "'%s': one word each side of '->' (CLIENT.INTERFACE -> "
                     "SERVER.SERVICE)", bf::Quoted(s).text);
          stray = true;
        }
      }
    }
    if (stray) continue;

    Binding b{};
    if (!bf::parse_endpoint(left, line, "client", "interface", b.client_uid, b.iface, errors)) continue;
    if (!bf::parse_endpoint(right, line, "server", "service", b.server_uid, b.service, errors)) continue;
    b.line = line;
    bool dup = false;
    for (std::size_t i = 0; i < count && !dup; ++i) {
      if (out[i].client_uid == b.client_uid && std::strcmp(out[i].iface, b.iface) == 0) {
        errors.add(Result::BadParameter, line, "client uid %lu has interface '%s' bound twice (lines %lu and %lu)",
                   static_cast<unsigned long>(b.client_uid), b.iface, static_cast<unsigned long>(out[i].line),
                   static_cast<unsigned long>(line));
        dup = true;
      }
    }
    if (dup) continue;
    if (count == LEMSG_DIR_MAX_BINDINGS) {
      // One error for all the lines that do not fit: at the first of them.
      if (!full)
        errors.add(Result::BindingTableFull, line, "more than LEMSG_DIR_MAX_BINDINGS (%d) bindings",
                   LEMSG_DIR_MAX_BINDINGS);
      full = true;
      continue;
    }
    out[count++] = b;
  }
  if (errors.count != 0) {
    errors.finish();
    return errors.first;
  }
  count_[next] = count;
  active_ = next;
  return Result::Ok;
}

inline Result Bindings::load(const char* path, char* err, std::size_t err_len) noexcept {
  if (err != nullptr && err_len > 0) err[0] = '\0';
  auto fail = [&](Result r, const char* what, int e) {
    if (err != nullptr && err_len > 0)
      std::snprintf(err, err_len, "%s: %s%s%s", path != nullptr ? path : "(null)", what, e != 0 ? ": " : "",
                    e != 0 ? std::strerror(e) : "");
    return r;
  };
  if (path == nullptr || path[0] == '\0') return fail(Result::BadParameter, "no file name", 0);
  int fd;
  // O_NONBLOCK: a FIFO in the file's place must not hang the daemon at open.
  do {
    fd = ::open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) {
    const int e = errno;
    return fail(e == ENOENT ? Result::NotFound : Result::SystemError, "cannot open", e);
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    return fail(Result::SystemError, "cannot open", e);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return fail(Result::BadParameter, "not a regular file", 0);
  }
  // Read to the end rather than trust st_size: the file may change meanwhile.
  std::size_t len = 0;
  bool too_large = false;
  for (;;) {
    char extra;
    const bool room = len < sizeof file_;
    const ssize_t got = room ? ::read(fd, file_ + len, sizeof file_ - len) : ::read(fd, &extra, 1);
    if (got < 0) {
      if (errno == EINTR) continue;
      const int e = errno;
      ::close(fd);
      return fail(Result::SystemError, "cannot read", e);
    }
    if (got == 0) break;
    if (!room) {
      too_large = true;
      break;
    }
    len += static_cast<std::size_t>(got);
  }
  ::close(fd);
  if (too_large) {
    if (err != nullptr && err_len > 0)
      std::snprintf(err, err_len, "%s: larger than LEMSG_DIR_MAX_BINDINGS_FILE (%lu bytes)", path,
                    static_cast<unsigned long>(LEMSG_DIR_MAX_BINDINGS_FILE));
    return Result::BadParameter;
  }
  return parse(file_, len, path, err, err_len);
}

inline const Binding* Bindings::find(uid_t client, const char* iface) const noexcept {
  if (iface == nullptr) return nullptr;
  const Binding* t = table_[active_];
  for (std::size_t i = 0; i < count_[active_]; ++i)
    if (t[i].client_uid == client && std::strcmp(t[i].iface, iface) == 0) return &t[i];
  return nullptr;
}

// -- introspection: the info query and the monitor ---------------------------
//
// Every Service answers these by itself (the application writes nothing), on
// a connection of their own that takes no session slot and runs no handler,
// and only for uid 0 or the service's own uid (SO_PEERCRED of the
// connection): anyone else gets NotPermitted, whatever the allow-list says.
// The connection is made to the socket file (query_info, Monitor::attach) or
// is any connected socket to the service (query_info_fd, Monitor::attach_fd:
// one the service directory handed over, say). The wire is in section 5
// ("Introspection"): a Hello with a reserved protocol id, "lemsg.info" or
// "lemsg.monitor", answered with one info record, or with a Welcome and then
// one record per frame.
//
//   query_info   name, protocol id and maximum payload, mode (direct or
//                directory), the open sessions (uid, gid, pid, requests
//                received and not yet answered, frames waiting in the
//                session's send queue), pool blocks in use, high water and
//                capacity, monitors attached, and counters since the Service
//                was made (see ServiceCounters).
//   Monitor      attach, then next() returns one MonitorRecord per frame the
//                service received from a session or sent (or queued) to one,
//                in order: its time (CLOCK_MONOTONIC of the device), the
//                direction, the session, type, txn, payload size, fd and
//                error flags, and with `with_payload` its first
//                LEMSG_MONITOR_PAYLOAD payload bytes. Handshake frames are
//                not shown. At most LEMSG_MAX_MONITORS per Service (one more:
//                Busy).
//
// The drop rule: the service sends each record once, without waiting. A
// monitor that does not read fills its socket and is dropped at once (its
// next() then returns Closed after the records already sent); the service's
// clients see nothing of it. A service with no monitor attached pays one
// test of a counter per frame.
//
// Both ends must be built with the same LEMSG_MAX_SESSIONS, LEMSG_MAX_NAME
// and LEMSG_MAX_PROTOCOL_ID (at least 13, the reserved ids' length):
// everything the service sends is checked against this build's bounds
// before it is used, and a record beyond them is a BadFrame.

/// How a service is reached, as its info says.
enum class ServiceMode : std::uint32_t { Direct = 0, Directory = 1 };

/// One open session of a service, as its info says.
struct SessionInfo {
  SessionRef session;
  Credentials creds;          // of the client, from SO_PEERCRED at connect time
  std::uint32_t pending = 0;  // requests the server received and has not answered
  std::uint32_t queued = 0;   // frames waiting in its send queue (the client is slow)
};

/// What a service counted since it was made. Sessions closed by reason count
/// opened sessions only; a refused connection counts in `refused`.
struct ServiceCounters {
  std::uint64_t requests = 0;          // requests received
  std::uint64_t responses = 0;         // responses sent, error responses included
  std::uint64_t messages_in = 0;       // one-way messages received
  std::uint64_t messages_out = 0;      // one-way messages sent
  std::uint64_t bad_frames = 0;        // malformed frames and hellos received
  std::uint64_t opened = 0;            // sessions opened
  std::uint64_t refused = 0;           // connections refused (allow-list, tables, ...)
  std::uint64_t monitors_dropped = 0;  // monitors dropped for not reading
  std::uint64_t closed_by_client = 0;  // close reason Closed: the client closed or died
  std::uint64_t closed_here = 0;       // Ok: the server closed it
  std::uint64_t closed_bad_frame = 0;  // BadFrame
  std::uint64_t closed_too_large = 0;  // TooLarge
  std::uint64_t closed_overflow = 0;   // Overflow
  std::uint64_t closed_stalled = 0;    // Stalled
  std::uint64_t closed_other = 0;      // any other reason
};

/// A service's answer to the info query. Fixed size (no heap); about 24
/// bytes per LEMSG_MAX_SESSIONS: keep it off small stacks.
struct ServiceInfo {
  char name[LEMSG_MAX_NAME + 1] = {};  // advertised name; "" when not advertised
  char protocol_id[LEMSG_MAX_PROTOCOL_ID + 1] = {};
  std::uint32_t max_payload = 0;
  ServiceMode mode = ServiceMode::Direct;
  Credentials server;  // the server process (SO_PEERCRED of the connection, not its word)
  std::uint32_t pool_in_use = 0;
  std::uint32_t pool_high_water = 0;
  std::uint32_t pool_capacity = 0;
  std::uint32_t monitors = 0;  // monitors attached
  std::uint32_t session_count = 0;
  SessionInfo sessions[LEMSG_MAX_SESSIONS];
  ServiceCounters counters;
};

/// Asks the service at the other end of the connected socket `fd` for its
/// info, waiting at most `timeout_ms` in all. The fd stays the caller's
/// (used up: close it). Ok with `out` filled; NotPermitted (not root nor the
/// service's user); Timeout; Closed (the service closed without answering);
/// BadFrame or TooLarge (the answer is malformed or beyond this build's
/// bounds); BadParameter; another Result the service refused with; SystemError.
inline Result query_info_fd(int fd, ServiceInfo& out, int timeout_ms) noexcept;

/// query_info_fd on a connection to <runtime dir>/<name>, or in directory
/// mode (LEMSG_DIRECTORY) on one the directory hands over (directory_connect;
/// `out.server` is then the server as the directory saw it). Also NotFound
/// (no server, or no directory), UnsafeRuntimeDir, Busy (backlog full),
/// BadParameter (name), and directory_connect's Results.
inline Result query_info(const char* name, ServiceInfo& out, int timeout_ms) noexcept;

/// Which way a frame went, seen from the service.
enum class Direction : std::uint8_t { In = 0, Out = 1 };

/// One frame a service received or sent, as its monitor tells it.
struct MonitorRecord {
  std::uint64_t time_ns = 0;  // CLOCK_MONOTONIC on the device, when the service handled it
  Direction direction = Direction::In;
  SessionRef session;
  wire::FrameType type = wire::FrameType::Message;  // Message, Request or Response
  std::uint32_t txn = 0;                            // 0 for a Message
  std::uint32_t size = 0;                           // the frame's payload bytes
  bool has_fd = false;
  bool error = false;  // an error response: the payload is a 4-byte Result
  std::uint32_t payload_size = 0;  // bytes of `payload` filled (0 unless asked for)
  unsigned char payload[LEMSG_MONITOR_PAYLOAD > 0 ? LEMSG_MONITOR_PAYLOAD : 1] = {};
};

/// A live view of a service's frames, for tools (`lemsg monitor NAME`).
/// Blocking, with timeouts; fd() lets a caller poll it instead. Not
/// thread-safe. Only root and the service's own uid may attach.
class Monitor {
 public:
  Monitor() noexcept = default;
  ~Monitor() { detach(); }
  Monitor(const Monitor&) = delete;
  Monitor& operator=(const Monitor&) = delete;

  /// Attaches to <runtime dir>/<name> (in directory mode: to the socket the
  /// directory hands over, as query_info). `with_payload`: ask for the first
  /// LEMSG_MONITOR_PAYLOAD bytes of each frame's payload. Ok; Busy (attached
  /// already here, or the service has LEMSG_MAX_MONITORS); NotPermitted;
  /// NotFound; Timeout; Closed; BadFrame; BadParameter; SystemError.
  Result attach(const char* name, bool with_payload, int timeout_ms) noexcept;
  /// Attaches over the connected socket `fd`, which it takes over in every
  /// case (closed on failure and by detach()). Results as attach().
  Result attach_fd(int fd, bool with_payload, int timeout_ms) noexcept;
  /// The next record, waiting at most `timeout_ms` (0: only what is there).
  /// Ok; Timeout; Closed (the service dropped this monitor, or went; the
  /// monitor is detached); BadFrame (a malformed record: detached);
  /// NotFound (not attached); SystemError.
  Result next(MonitorRecord& out, int timeout_ms) noexcept;
  /// Closes the connection; the service frees the monitor's place.
  void detach() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  bool attached() const noexcept { return fd_ >= 0; }
  /// The connection, to poll for POLLIN; -1 when not attached.
  int fd() const noexcept { return fd_; }

 private:
  int fd_ = -1;
};

// -- implementation --

inline Result directory_connect(const char* name, int& fd, int timeout_ms, Credentials* server = nullptr) noexcept;  // below

namespace detail {

// Sends an introspection hello for `id` on `fd`.
inline Result send_intro_hello(int fd, const char* id, std::uint32_t arg) noexcept {
  const std::uint32_t idlen = static_cast<std::uint32_t>(std::strlen(id));
  if (idlen > LEMSG_MAX_PROTOCOL_ID) return Result::BadParameter;
  unsigned char hello[8 + LEMSG_MAX_PROTOCOL_ID];
  std::memcpy(hello, &arg, 4);
  std::memcpy(hello + 4, &idlen, 4);
  std::memcpy(hello + 8, id, idlen);
  return send_control(fd, wire::FrameType::Hello, 0, 0, hello, 8 + idlen);
}

// Receives one datagram of at most `cap` bytes from `fd` before `deadline`
// (now_ns()); an fd that comes with it is closed and makes it a BadFrame.
inline Result intro_receive(int fd, unsigned char* buf, std::size_t cap, std::size_t& len,
                            std::int64_t deadline) noexcept {
  for (;;) {
    int rfd = -1;
    Result r = recv_datagram(fd, buf, cap, len, rfd);
    if (rfd >= 0) {
      ::close(rfd);
      return Result::BadFrame;
    }
    if (r != Result::WouldBlock) return r;
    struct pollfd pfd = {fd, POLLIN, 0};
    const int rc = ::poll(&pfd, 1, ms_until(deadline));
    if (rc < 0 && errno != EINTR) return Result::SystemError;
    if (rc == 0) return Result::Timeout;
  }
}

// The Result a Refuse frame of `len` bytes at `buf` carries (BadFrame for
// one this build does not know).
inline Result refusal(const unsigned char* buf) noexcept {
  std::int32_t code;
  std::memcpy(&code, buf + wire::header_size, 4);
  return known_result(code) ? static_cast<Result>(code) : Result::BadFrame;
}

// Empties `out` field by field (a ServiceInfo{} temporary would be as large
// as the sessions array).
inline void clear_info(ServiceInfo& out) noexcept {
  std::memset(out.name, 0, sizeof out.name);
  std::memset(out.protocol_id, 0, sizeof out.protocol_id);
  out.max_payload = 0;
  out.mode = ServiceMode::Direct;
  out.server = Credentials{};
  out.pool_in_use = out.pool_high_water = out.pool_capacity = 0;
  out.monitors = 0;
  out.session_count = 0;
  for (SessionInfo& si : out.sessions) si = SessionInfo{};
  out.counters = ServiceCounters{};
}

inline bool valid_name_bytes(const unsigned char* p, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) {
    const unsigned char c = p[i];
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                    c == '_' || c == '-';
    if (!ok || (i == 0 && c == '.')) return false;
  }
  return true;
}

// Decodes and checks an info record of exactly `len` bytes.
inline Result decode_info(const unsigned char* rec, std::size_t len, ServiceInfo& out) noexcept {
  if (len < wire::info_fixed_size) return Result::BadFrame;
  const std::uint32_t version = get32(rec), mode = get32(rec + 4);
  const std::uint32_t in_use = get32(rec + 12), high = get32(rec + 16), cap = get32(rec + 20);
  const std::uint32_t name_len = get32(rec + 24), id_len = get32(rec + 28), count = get32(rec + 32);
  if (version != 1 || mode > 1 || in_use > high || high > cap) return Result::BadFrame;
  if (name_len > LEMSG_MAX_NAME || id_len == 0 || id_len > LEMSG_MAX_PROTOCOL_ID || count > LEMSG_MAX_SESSIONS)
    return Result::BadFrame;
  // Each bounded above, so the sum cannot wrap.
  if (len != wire::info_fixed_size + name_len + id_len + wire::info_session_size * count) return Result::BadFrame;
  const unsigned char* name = rec + wire::info_fixed_size;
  const unsigned char* id = name + name_len;
  if (!valid_name_bytes(name, name_len) || std::memchr(id, 0, id_len) != nullptr) return Result::BadFrame;
  const Credentials server = out.server;
  clear_info(out);
  out.server = server;
  std::memcpy(out.name, name, name_len);
  std::memcpy(out.protocol_id, id, id_len);
  out.max_payload = get32(rec + 8);
  out.mode = static_cast<ServiceMode>(mode);
  out.pool_in_use = in_use;
  out.pool_high_water = high;
  out.pool_capacity = cap;
  out.monitors = get32(rec + 36);
  out.session_count = count;
  std::uint64_t ServiceCounters::* const fields[] = {
      &ServiceCounters::requests,         &ServiceCounters::responses,       &ServiceCounters::messages_in,
      &ServiceCounters::messages_out,     &ServiceCounters::bad_frames,      &ServiceCounters::opened,
      &ServiceCounters::refused,          &ServiceCounters::monitors_dropped, &ServiceCounters::closed_by_client,
      &ServiceCounters::closed_here,      &ServiceCounters::closed_bad_frame, &ServiceCounters::closed_too_large,
      &ServiceCounters::closed_overflow,  &ServiceCounters::closed_stalled,  &ServiceCounters::closed_other};
  static_assert(sizeof fields / sizeof fields[0] == wire::info_counter_count, "one field per counter");
  for (std::size_t i = 0; i < wire::info_counter_count; ++i) out.counters.*fields[i] = get64(rec + 40 + 8 * i);
  const unsigned char* at = id + id_len;
  for (std::uint32_t i = 0; i < count; ++i, at += wire::info_session_size) {
    SessionInfo& si = out.sessions[i];
    si.session = SessionRef{get32(at)};
    si.creds.pid = static_cast<pid_t>(get32(at + 4));
    si.creds.uid = static_cast<uid_t>(get32(at + 8));
    si.creds.gid = static_cast<gid_t>(get32(at + 12));
    si.pending = get32(at + 16);
    si.queued = get32(at + 20);
    if (!si.session) return Result::BadFrame;
  }
  return Result::Ok;
}

// Connects to the socket of service `name` (direct mode).
// `via` is set when the directory handed the socket over: then `server` has
// the server's identity (SO_PEERCRED would name the directory).
inline Result intro_connect(const char* name, int& fd, bool& via, Credentials& server) noexcept {
  fd = -1;
  char path[sizeof(sockaddr_un::sun_path)];
  // Directory mode: the directory hands us the service's socket (to root and
  // the service's own uid only).
  via = directory_mode(Discovery::Auto, path);
  if (via) return directory_connect(name, fd, LEMSG_OPEN_TIMEOUT_MS, &server);
  Result r = socket_path(name, path);
  if (r != Result::Ok) return r;
  r = check_socket_dir(path);
  if (r != Result::Ok) return r;
  return connect_to(path, fd);
}

}  // namespace detail

inline Result query_info_fd(int fd, ServiceInfo& out, int timeout_ms) noexcept {
  if (fd < 0 || timeout_ms < 0) return Result::BadParameter;
  const std::int64_t deadline = detail::now_ns() + static_cast<std::int64_t>(timeout_ms) * 1000000;
  Result r = detail::send_intro_hello(fd, wire::info_id, 0);
  // Closed: refused at accept, maybe; the Refuse is waiting to be read.
  if (r != Result::Ok && r != Result::Closed) return r;
  Credentials server;
  if (detail::peer_credentials(fd, server) != Result::Ok) return Result::SystemError;
  // The record is read into a buffer on the stack, sized like ServiceInfo's sessions.
  unsigned char buf[wire::header_size + wire::info_max_size];
  std::size_t len = 0;
  r = detail::intro_receive(fd, buf, sizeof buf, len, deadline);
  if (r != Result::Ok) return r;
  wire::Header h;
  r = wire::decode(buf, len, static_cast<std::uint32_t>(wire::info_max_size), h);
  if (r != Result::Ok) return r;
  if (h.type == wire::FrameType::Refuse) return detail::refusal(buf);
  if (h.type != wire::FrameType::Message || h.flags != 0) return Result::BadFrame;
  out.server = server;
  r = detail::decode_info(buf + wire::header_size, h.length, out);
  if (r != Result::Ok) detail::clear_info(out);
  return r;
}

inline Result query_info(const char* name, ServiceInfo& out, int timeout_ms) noexcept {
  if (timeout_ms < 0) return Result::BadParameter;
  int fd = -1;
  bool via = false;
  Credentials server;
  Result r = detail::intro_connect(name, fd, via, server);
  if (r != Result::Ok) return r;
  r = query_info_fd(fd, out, timeout_ms);
  ::close(fd);
  if (r == Result::Ok && via) out.server = server;
  return r;
}

inline Result Monitor::attach(const char* name, bool with_payload, int timeout_ms) noexcept {
  if (fd_ >= 0) return Result::Busy;
  if (timeout_ms < 0) return Result::BadParameter;
  int fd = -1;
  bool via = false;
  Credentials server;
  const Result r = detail::intro_connect(name, fd, via, server);
  if (r != Result::Ok) return r;
  return attach_fd(fd, with_payload, timeout_ms);
}

inline Result Monitor::attach_fd(int fd, bool with_payload, int timeout_ms) noexcept {
  if (fd < 0) return Result::BadParameter;
  if (fd_ >= 0) {
    ::close(fd);
    return Result::Busy;
  }
  if (timeout_ms < 0) {
    ::close(fd);
    return Result::BadParameter;
  }
  const std::int64_t deadline = detail::now_ns() + static_cast<std::int64_t>(timeout_ms) * 1000000;
  Result r = detail::send_intro_hello(fd, wire::monitor_id, with_payload ? LEMSG_MONITOR_PAYLOAD : 0);
  if (r == Result::Closed) r = Result::Ok;  // refused at accept: read the Refuse
  unsigned char buf[wire::header_size + 4];
  std::size_t len = 0;
  if (r == Result::Ok) r = detail::intro_receive(fd, buf, sizeof buf, len, deadline);
  wire::Header h;
  if (r == Result::Ok) r = wire::decode(buf, len, 0, h);
  if (r == Result::Ok && h.type == wire::FrameType::Refuse) r = detail::refusal(buf);
  else if (r == Result::Ok && h.type != wire::FrameType::Welcome) r = Result::BadFrame;
  if (r != Result::Ok) {
    ::close(fd);
    return r;
  }
  fd_ = fd;
  return Result::Ok;
}

inline Result Monitor::next(MonitorRecord& out, int timeout_ms) noexcept {
  if (fd_ < 0) return Result::NotFound;
  if (timeout_ms < 0) return Result::BadParameter;
  const std::int64_t deadline = detail::now_ns() + static_cast<std::int64_t>(timeout_ms) * 1000000;
  unsigned char buf[wire::header_size + wire::record_fixed_size + LEMSG_MONITOR_PAYLOAD];
  std::size_t len = 0;
  Result r = detail::intro_receive(fd_, buf, sizeof buf, len, deadline);
  if (r == Result::Timeout || r == Result::SystemError) return r;
  wire::Header h;
  if (r == Result::Ok) r = wire::decode(buf, len, static_cast<std::uint32_t>(sizeof buf - wire::header_size), h);
  if (r == Result::TooLarge) r = Result::BadFrame;
  if (r == Result::Ok && (h.type != wire::FrameType::Message || h.flags != 0 || h.length < wire::record_fixed_size))
    r = Result::BadFrame;
  const unsigned char* rec = buf + wire::header_size;
  if (r == Result::Ok) {
    const std::uint8_t dir = rec[12], type = rec[13], flags = rec[14];
    const std::uint32_t ref = detail::get32(rec + 8), txn = detail::get32(rec + 16);
    const std::uint32_t size = detail::get32(rec + 20), n = detail::get32(rec + 24);
    const bool typed = type == static_cast<std::uint8_t>(wire::FrameType::Message) ||
                       type == static_cast<std::uint8_t>(wire::FrameType::Request) ||
                       type == static_cast<std::uint8_t>(wire::FrameType::Response);
    const bool has_txn = type != static_cast<std::uint8_t>(wire::FrameType::Message);
    if (dir > 1 || !typed || (flags & ~(wire::FlagFd | wire::FlagError)) != 0 || rec[15] != 0 || ref == 0 ||
        has_txn != (txn != 0) || n > LEMSG_MONITOR_PAYLOAD || n > size || h.length != wire::record_fixed_size + n)
      r = Result::BadFrame;
    if (r == Result::Ok) {
      out.time_ns = detail::get64(rec);
      out.direction = static_cast<Direction>(dir);
      out.session = SessionRef{ref};
      out.type = static_cast<wire::FrameType>(type);
      out.txn = txn;
      out.size = size;
      out.has_fd = (flags & wire::FlagFd) != 0;
      out.error = (flags & wire::FlagError) != 0;
      out.payload_size = n;
      if (n) std::memcpy(out.payload, rec + wire::record_fixed_size, n);
      return Result::Ok;
    }
  }
  if (r != Result::Closed)
    LEMSG_LOG(Warning, "monitor: a malformed record from the service: %s; detaching", to_string(r));
  detach();
  return r == Result::Closed ? r : Result::BadFrame;
}

// -- directory mode: the protocol --------------------------------------------
//
// Directory mode. A daemon built from this header (class Directory; the
// program is examples/lemsg-dir.cpp) listens on one socket, by default
// <runtime dir>/directory, mode 0666: who may do what is decided by the
// bindings, by uid from SO_PEERCRED, not by the file's mode.
//
//   - A server (Service::advertise in directory mode) connects, registers its
//     name and keeps that connection open: the directory sees the server die
//     (the connection hangs up) and unregisters it at once. The directory
//     checks the server's uid with SO_PEERCRED. A second server registering a
//     name already registered gets Duplicate; a name a binding gives to
//     another user's service gets NotPermitted (nobody can squat a bound
//     name). When the directory goes away, the server registers again by
//     itself (after 50 ms, doubling to 1 s) until it is back; its open
//     sessions do not notice.
//   - A client (Session::open, open_sync, try_open in directory mode) connects
//     and asks for an interface by its own name. The directory finds the
//     binding of (client uid, interface) -> (server uid, service). try_open:
//     no binding is NotPermitted, a bound server not registered is NotFound.
//     open/open_sync: the request waits in the directory (no polling on
//     either side) until the binding exists (SIGHUP reload) and its server is
//     registered, or until the client's own timeout ends it. Then the
//     directory answers the client (Ok, with the server's pid, uid and gid),
//     hands the client's connected socket to the server over its
//     registration connection (SCM_RIGHTS) and closes its own copy. From
//     there the session is a direct socket, exactly as in direct mode: the
//     same hello, protocol check, allow-list and speed; the directory is off
//     the path, and its death does not touch the session. A client waiting
//     when the directory dies connects to it again (waiting, with inotify, for
//     its socket to reappear) within its timeout.
//   - Bindings change on reload (Directory::reload, SIGHUP in lemsg-dir): new
//     bindings apply to new requests and to the clients waiting. A session
//     already handed over is not touched when its binding is removed: the
//     directory is no longer on its path. Restart the server (or close the
//     session in it) to end such sessions.
//   - A tool (the `lemsg` program) may ask for a registered service by its
//     name, not an interface (Connect): only root and the service's own uid
//     get its socket (for the info query and the monitor); anyone may wait for
//     a name to be registered (probe) and list the directory.
//
// Frames are the wire section's: a 16-byte header of type Message, txn 0,
// the fd flag only on HandOff. The payload is one record:
//   byte 0 op: 1 Register, 2 Open, 3 Connect, 4 List (to the directory);
//              0x81 Registered, 0x82 Answer, 0x83 HandOff, 0x84 Entry,
//              0x85 End (from it)
//   byte 1 flags: bit 0 wait, bit 1 probe (Connect), bit 2 hello (HandOff);
//              for Entry the kind
//              (1 service, 2 waiting client, 3 binding)
//   byte 2 name length, byte 3 text length
//   bytes 4-19  u32 a, b, c, d (per op)
//   then the name and the text (no NUL)
// Register: a = max payload, name = service, text = protocol id.
// Registered: a = Result. Open: name = interface. Connect: name = service.
// Answer: a = Result, b, c, d = the server's pid, uid, gid when Ok.
// HandOff: a, b, c = the client's pid, uid, gid (the server reads them again
// from SO_PEERCRED of the socket it gets); with the hello flag, d and text
// are the client's hello (max payload, protocol id), which the directory
// read out of the socket while the client waited: a waiting client may send
// its hello and nothing else, and anything else (an fd above all: its own
// socket would keep its connection alive after it died) ends its wait. Entry: service: a uid, b pid,
// c max payload, name, text protocol id; waiting client: a uid, b pid, name
// interface; binding: a client uid, b server uid, name interface, text
// service. End: a = the number of entries.
// A receiver checks the header, then that the lengths add up exactly, the
// op is one it expects and the names are valid; anything else closes the
// connection.


// -- directory mode: tools ------------------------------------------------------

/// One line of the directory's state, for `lemsg list` and `lemsg bindings`.
struct DirectoryEntry {
  enum Kind : std::uint8_t { Service = 1, WaitingClient = 2, Binding = 3 };
  Kind kind = Service;
  uid_t uid = 0;         // service: its owner; waiting client: the client; binding: the client user
  uid_t server_uid = 0;  // binding: the server user
  pid_t pid = 0;         // service and waiting client
  std::uint32_t max_payload = 0;                       // service
  char name[LEMSG_MAX_NAME + 1] = {};                  // service name, or interface
  char text[detail::dirwire::max_text + 1] = {};       // protocol id, or a binding's service
};

/// Asks the directory (Discovery::Auto's path, or the default when directory
/// mode is off) for its state and calls f(const DirectoryEntry&) for each
/// entry: registered services, waiting clients, bindings. Ok; NotFound (no
/// directory running); Timeout; BadFrame; the errors of connecting.
template <typename F>
Result directory_list(F&& f, int timeout_ms) noexcept;

/// Waits until service `name` is registered with the directory, at most
/// `timeout_ms` (0: just look). Ok, Timeout, NotFound (timeout 0 and not
/// registered, or no directory), BadParameter.
inline Result directory_wait(const char* name, int timeout_ms) noexcept;

/// A connected socket to registered service `name`, handed over by the
/// directory like a client's (for the info query and the monitor: the
/// directory gives it only to root and the service's own uid, else
/// NotPermitted). `fd` is then the caller's to close; `server`, when not
/// null, gets the server's pid, uid and gid as the directory saw them (the
/// socket's SO_PEERCRED names the directory). Ok, NotFound, NotPermitted,
/// Timeout, BadParameter, BadFrame.
inline Result directory_connect(const char* name, int& fd, int timeout_ms, Credentials* server) noexcept;

namespace detail {
// The directory's socket: the environment's when set, else <runtime dir>/directory.
inline void directory_path(char (&path)[sizeof(sockaddr_un::sun_path)]) noexcept {
  if (!directory_mode(Discovery::Auto, path)) (void)directory_mode(Discovery::Directory, path);
}
// One request and its answer (Answer or End records are handled by the caller).
inline Result directory_request(const dirwire::Record& req, int& fd, std::int64_t deadline) noexcept {
  char path[sizeof(sockaddr_un::sun_path)];
  directory_path(path);
  if (!path[0]) return Result::BadParameter;
  Result r;
  for (;;) {
    r = dirwire::ask(path, req, fd);
    if (r != Result::Busy || ms_until(deadline) == 0) return r;
    while (::poll(nullptr, 0, 10) < 0 && errno == EINTR) {
    }
  }
}
}  // namespace detail

template <typename F>
Result directory_list(F&& f, int timeout_ms) noexcept {
  detail::dirwire::Record req;
  req.op = detail::dirwire::List;
  const std::int64_t deadline = detail::now_ns() + static_cast<std::int64_t>(timeout_ms) * 1000000;
  int fd = -1;
  Result r = detail::directory_request(req, fd, deadline);
  if (r != Result::Ok) return r;
  std::uint32_t count = 0;
  for (;;) {
    detail::dirwire::Record e;
    r = detail::dirwire::wait(fd, e, deadline);
    if (r != Result::Ok) break;
    if (e.op == detail::dirwire::End) {
      r = e.a == count ? Result::Ok : Result::BadFrame;
      break;
    }
    if (e.op != detail::dirwire::Entry || e.flags < 1 || e.flags > 3) {
      r = Result::BadFrame;
      break;
    }
    DirectoryEntry out;
    out.kind = static_cast<DirectoryEntry::Kind>(e.flags);
    out.uid = static_cast<uid_t>(e.a);
    if (out.kind == DirectoryEntry::Binding) out.server_uid = static_cast<uid_t>(e.b);
    else out.pid = static_cast<pid_t>(e.b);
    out.max_payload = e.c;
    std::memcpy(out.name, e.name, sizeof out.name);
    std::memcpy(out.text, e.text, sizeof out.text);
    ++count;
    f(static_cast<const DirectoryEntry&>(out));
  }
  ::close(fd);
  return r;
}

inline Result directory_connect(const char* name, int& fd, int timeout_ms, Credentials* server) noexcept {
  fd = -1;
  if (!detail::valid_name(name) || timeout_ms < 0) return Result::BadParameter;
  detail::dirwire::Record req;
  req.op = detail::dirwire::Connect;
  detail::dirwire::set_text(req.name, sizeof req.name, name);
  const std::int64_t deadline = detail::now_ns() + static_cast<std::int64_t>(timeout_ms) * 1000000;
  int s = -1;
  Result r = detail::directory_request(req, s, deadline);
  if (r != Result::Ok) return r;
  detail::dirwire::Record a;
  r = detail::dirwire::wait(s, a, deadline);
  if (r == Result::Ok) r = a.op == detail::dirwire::Answer ? detail::dirwire::answer_code(a.a) : Result::BadFrame;
  if (r != Result::Ok) {
    ::close(s);
    return r;
  }
  if (server) {
    server->pid = static_cast<pid_t>(a.b);
    server->uid = static_cast<uid_t>(a.c);
    server->gid = static_cast<gid_t>(a.d);
  }
  fd = s;
  return Result::Ok;
}

inline Result directory_wait(const char* name, int timeout_ms) noexcept {
  if (!detail::valid_name(name) || timeout_ms < 0) return Result::BadParameter;
  detail::dirwire::Record req;
  req.op = detail::dirwire::Connect;
  req.flags = detail::dirwire::FlagProbe | (timeout_ms > 0 ? detail::dirwire::FlagWait : 0);
  detail::dirwire::set_text(req.name, sizeof req.name, name);
  const std::int64_t deadline = detail::now_ns() + static_cast<std::int64_t>(timeout_ms) * 1000000;
  char path[sizeof(sockaddr_un::sun_path)];
  detail::directory_path(path);
  detail::SocketWaiter waiter;
  bool watched = false;
  for (;;) {
    int s = -1;
    Result r = detail::dirwire::ask(path, req, s);
    if (r == Result::Ok) {
      detail::dirwire::Record a;
      r = detail::dirwire::wait(s, a, deadline);
      ::close(s);
      if (r == Result::Ok) return a.op == detail::dirwire::Answer ? detail::dirwire::answer_code(a.a) : Result::BadFrame;
      if (r != Result::Closed) return r;  // Closed: the directory went away; wait for it again
    } else if (r != Result::NotFound && r != Result::Busy) {
      return r;
    }
    if (detail::ms_until(deadline) == 0) return timeout_ms == 0 ? Result::NotFound : Result::Timeout;
    if (!watched) {
      watched = true;
      (void)waiter.start(path);
      continue;
    }
    waiter.wait(path, detail::ms_until(deadline), r == Result::Busy || r == Result::Closed);
  }
}

// -- directory mode: the daemon ---------------------------------------------------

/// How a Directory starts.
struct DirectoryOptions {
  /// Its socket; nullptr: LEMSG_DIRECTORY when it is a path, else
  /// <runtime dir>/directory (the runtime dir is created, mode 0755, if missing).
  const char* socket_path = nullptr;
  /// The bindings file (see Bindings); nullptr: none, so nothing is bound
  /// (servers may register; clients wait or are refused).
  const char* bindings_path = nullptr;
  /// The socket file's mode: 0666, everyone may ask; the bindings decide.
  mode_t mode = 0666;
};

/// The service directory: the core of the lemsg-dir daemon, on a Loop like
/// everything else (so tests run it in a forked child). Fixed tables: at
/// most LEMSG_DIR_MAX_SERVICES registered services (more: RegistryFull to
/// the server), LEMSG_DIR_MAX_WAITING waiting clients (more: WaitTableFull
/// to the client; one uid other than root may hold half of them, so one
/// user's flood does not lock the others out), and LEMSG_DIR_MAX_CONNECTIONS
/// connections that have not sent their request yet (per uid at most
/// LEMSG_DIR_MAX_CONNECTIONS_PER_UID; beyond either, the oldest of them is
/// closed; each must speak within LEMSG_OPEN_TIMEOUT_MS). Every connection
/// takes one of the loop's watches.
class Directory {
 public:
  explicit Directory(Loop& loop) noexcept;
  /// Closes every connection (servers register again elsewhere; waiting
  /// clients reconnect) and removes the socket file if it is still ours.
  ~Directory();
  Directory(const Directory&) = delete;
  Directory& operator=(const Directory&) = delete;

  /// Loads the bindings file (errors, with file name and line, go to `err`),
  /// then listens. Ok; the errors of Bindings::load; Duplicate (another
  /// directory listens there); Busy (started already); BadParameter (the
  /// socket path is too long); NoRuntimeDir, UnsafeRuntimeDir, NotPermitted,
  /// WatchTableFull, TimerTableFull, SystemError.
  Result start(const DirectoryOptions& options, char* err, std::size_t err_len) noexcept;
  /// Reads the bindings file again. Ok: new bindings apply to new requests
  /// and to the clients waiting (those now bound to a registered server are
  /// handed over at once); sessions already handed over are not touched.
  /// On error (in `err`) the old bindings stay in force; NotFound when the
  /// directory was started without a bindings file.
  Result reload(char* err, std::size_t err_len) noexcept;
  /// Blocks SIGHUP, SIGTERM and SIGINT in the calling thread and takes them
  /// from a signalfd on the loop: SIGHUP reloads (the outcome is logged),
  /// SIGTERM and SIGINT stop the loop. Ok, SystemError, WatchTableFull;
  /// Busy when called a second time.
  Result handle_signals() noexcept;

  std::size_t service_count() const noexcept { return servers_; }
  std::size_t waiting_count() const noexcept { return waiting_; }
  /// Clients handed over to their server since start.
  std::uint64_t handed_count() const noexcept { return handed_; }
  const Bindings& bindings() const noexcept { return bindings_; }
  const char* socket_path() const noexcept { return path_; }

 private:
  enum class Role : std::uint8_t { Free, New, Server, Waiting };
  struct Conn {
    int fd = -1;
    WatchId watch;
    Credentials creds;
    Role role = Role::Free;
    std::int64_t deadline = 0;  // New: closed when nothing came by then
    std::uint64_t seq = 0;      // accept order
    detail::dirwire::Record req;  // Server: its Register; Waiting: its Open or Connect
    // Waiting: the client's hello, read out of the socket (see on_conn).
    bool has_hello = false;
    std::uint32_t hello_max = 0;
    char hello_id[LEMSG_MAX_PROTOCOL_ID + 1] = {};
  };
  static constexpr std::size_t slots = LEMSG_DIR_MAX_CONNECTIONS + LEMSG_DIR_MAX_SERVICES + LEMSG_DIR_MAX_WAITING;

  void on_listen() noexcept;
  void on_conn(std::size_t i) noexcept;
  void on_signal() noexcept;
  void on_timer() noexcept;
  void reschedule() noexcept;
  void request(std::size_t i, const detail::dirwire::Record& r) noexcept;
  // Hands waiting or new connection `i` over when it can be; true when it
  // was answered (and is gone).
  bool resolve(std::size_t i, bool may_wait) noexcept;
  void resolve_waiting() noexcept;
  void hand_over(std::size_t i, std::size_t server) noexcept;
  void answer(std::size_t i, Result code) noexcept;  // answers and closes
  void drop(std::size_t i) noexcept;
  // Reads a waiting client's hello into `c`. True when it was one (or
  // nothing was there yet); false: anything else, or the hang-up.
  static bool take_hello(Conn& c) noexcept;
  int find_service(const char* name) const noexcept;
  bool make_room(uid_t uid) noexcept;  // for a new connection of `uid`
  std::size_t count(Role role, uid_t uid) const noexcept;

  Loop& loop_;
  Bindings bindings_;
  char bindings_path_[256] = {};
  char path_[sizeof(sockaddr_un::sun_path)] = {};
  detail::SocketFile file_;
  pid_t owner_pid_ = 0;
  int listen_fd_ = -1;
  WatchId listen_watch_;
  int signal_fd_ = -1;
  WatchId signal_watch_;
  TimerId timer_;
  Conn conns_[slots];
  std::size_t new_ = 0, servers_ = 0, waiting_ = 0;
  std::uint64_t seq_ = 0;
  std::uint64_t handed_ = 0;
};

inline Directory::Directory(Loop& loop) noexcept : loop_(loop) {
  Result r = loop_.add_timer([this] { on_timer(); }, timer_);
  if (r != Result::Ok) LEMSG_LOG(Error, "directory: no timer: %s", to_string(r));
}

inline Directory::~Directory() {
  for (std::size_t i = 0; i < slots; ++i)
    if (conns_[i].role != Role::Free) drop(i);
  Result r;
  if (listen_fd_ >= 0) {
    r = loop_.remove_watch(listen_watch_);
    if (owner_pid_ == ::getpid()) (void)detail::remove_socket_file(path_, file_);
    ::close(listen_fd_);
  }
  if (signal_fd_ >= 0) {
    r = loop_.remove_watch(signal_watch_);
    ::close(signal_fd_);
  }
  if (timer_) r = loop_.remove_timer(timer_);
  (void)r;
}

inline Result Directory::start(const DirectoryOptions& options, char* err, std::size_t err_len) noexcept {
  if (err && err_len) err[0] = '\0';
  if (listen_fd_ >= 0) return Result::Busy;
  if (!timer_) return Result::TimerTableFull;
  if (options.socket_path) {
    if (std::strlen(options.socket_path) >= sizeof path_) return Result::BadParameter;
    std::memcpy(path_, options.socket_path, std::strlen(options.socket_path) + 1);
  } else {
    detail::directory_path(path_);
    if (!path_[0]) return Result::BadParameter;
    const char* dir = runtime_dir();
    if (std::strncmp(path_, dir, std::strlen(dir)) == 0 && ::mkdir(dir, 0755) == 0) (void)::chmod(dir, 0755);
  }
  if (options.bindings_path) {
    if (std::strlen(options.bindings_path) >= sizeof bindings_path_) return Result::BadParameter;
    std::memcpy(bindings_path_, options.bindings_path, std::strlen(options.bindings_path) + 1);
    const Result b = bindings_.load(bindings_path_, err, err_len);
    if (b != Result::Ok) return b;
  }
  Result r = detail::check_socket_dir(path_);
  if (r == Result::NotFound) r = Result::NoRuntimeDir;
  if (r != Result::Ok) return r;
  int fd = -1;
  r = detail::listen_at(path_, options.mode, fd, static_cast<gid_t>(-1), &file_);
  if (r != Result::Ok) return r;
  r = loop_.add_watch(fd, Readable, [this](int, short) { on_listen(); }, listen_watch_);
  if (r != Result::Ok) {
    (void)detail::remove_socket_file(path_, file_);
    ::close(fd);
    return r;
  }
  listen_fd_ = fd;
  owner_pid_ = ::getpid();
  LEMSG_LOG(Info, "directory: listening at %s, %lu bindings", path_, static_cast<unsigned long>(bindings_.size()));
  return Result::Ok;
}

inline Result Directory::reload(char* err, std::size_t err_len) noexcept {
  if (err && err_len) err[0] = '\0';
  if (!bindings_path_[0]) return Result::NotFound;
  const Result r = bindings_.load(bindings_path_, err, err_len);
  if (r != Result::Ok) return r;
  LEMSG_LOG(Info, "directory: %lu bindings loaded from %s", static_cast<unsigned long>(bindings_.size()),
            bindings_path_);
  resolve_waiting();
  return Result::Ok;
}

inline Result Directory::handle_signals() noexcept {
  if (signal_fd_ >= 0) return Result::Busy;
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGHUP);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  if (::pthread_sigmask(SIG_BLOCK, &set, nullptr) != 0) return Result::SystemError;
  const int fd = ::signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
  if (fd < 0) return Result::SystemError;
  const Result r = loop_.add_watch(fd, Readable, [this](int, short) { on_signal(); }, signal_watch_);
  if (r != Result::Ok) {
    ::close(fd);
    return r;
  }
  signal_fd_ = fd;
  return Result::Ok;
}

inline void Directory::on_signal() noexcept {
  struct signalfd_siginfo si;
  while (::read(signal_fd_, &si, sizeof si) == static_cast<ssize_t>(sizeof si)) {
    if (si.ssi_signo == SIGHUP) {
      char err[256];
      const Result r = reload(err, sizeof err);
      if (r != Result::Ok)
        LEMSG_LOG(Error, "directory: reload failed, the old bindings stay: %s", err[0] ? err : to_string(r));
    } else {
      LEMSG_LOG(Info, "directory: signal %u; stopping", static_cast<unsigned>(si.ssi_signo));
      loop_.stop();
    }
  }
}

inline std::size_t Directory::count(Role role, uid_t uid) const noexcept {
  std::size_t n = 0;
  for (const Conn& c : conns_)
    if (c.role == role && c.creds.uid == uid) ++n;
  return n;
}

inline bool Directory::make_room(uid_t uid) noexcept {
  // Beyond its uid's share, or when the table is full, the oldest silent
  // connection (of that uid first) makes room: silent connections cannot
  // lock others out.
  const bool over_share = uid != 0 && count(Role::New, uid) >= LEMSG_DIR_MAX_CONNECTIONS_PER_UID;
  if (!over_share && new_ < LEMSG_DIR_MAX_CONNECTIONS) return true;
  std::size_t oldest = slots;
  for (std::size_t i = 0; i < slots; ++i) {
    const Conn& c = conns_[i];
    if (c.role != Role::New || (over_share && c.creds.uid != uid)) continue;
    if (oldest == slots || c.seq < conns_[oldest].seq) oldest = i;
  }
  if (oldest == slots) return false;
  LEMSG_LOG(Warning, "directory: too many silent connections%s; closing the oldest (uid %u)",
            over_share ? " of one uid" : "", static_cast<unsigned>(conns_[oldest].creds.uid));
  drop(oldest);
  return true;
}

inline void Directory::on_listen() noexcept {
  for (int n = 0; n < 16; ++n) {
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED) {
        LEMSG_LOG(Warning, "directory: accept failed: %s", std::strerror(errno));
        // Out of fds: stop listening for a moment (the timer turns it back on).
        Result r = loop_.set_events(listen_watch_, 0);
        r = loop_.arm_timer(timer_, 100);
        (void)r;
      }
      return;
    }
    Credentials c;
    if (detail::peer_credentials(fd, c) != Result::Ok || !make_room(c.uid)) {
      ::close(fd);
      continue;
    }
    std::size_t i = 0;
    while (i < slots && conns_[i].role != Role::Free) ++i;
    if (i == slots) {  // cannot happen: New, Server and Waiting each have their own room
      ::close(fd);
      continue;
    }
    Conn& k = conns_[i];
    if (loop_.add_watch(fd, Readable, [this, i](int, short) { on_conn(i); }, k.watch) != Result::Ok) {
      LEMSG_LOG(Warning, "directory: watch table full (raise LEMSG_MAX_WATCHES); closing a connection");
      ::close(fd);
      continue;
    }
    k.fd = fd;
    k.creds = c;
    k.role = Role::New;
    k.seq = ++seq_;
    k.deadline = detail::now_ns() + static_cast<std::int64_t>(LEMSG_OPEN_TIMEOUT_MS) * 1000000;
    k.req = detail::dirwire::Record{};
    ++new_;
    // A client sends its question right after connecting: it is usually
    // here already, so answer it now rather than after another poll.
    on_conn(i);
    reschedule();
  }
}

inline void Directory::drop(std::size_t i) noexcept {
  Conn& c = conns_[i];
  if (c.role == Role::Free) return;
  Result r = loop_.remove_watch(c.watch);
  (void)r;
  ::close(c.fd);
  if (c.role == Role::New) --new_;
  else if (c.role == Role::Server) --servers_;
  else if (c.role == Role::Waiting) --waiting_;
  c = Conn{};
}

inline void Directory::answer(std::size_t i, Result code) noexcept {
  detail::dirwire::Record a;
  a.op = detail::dirwire::Answer;
  a.a = static_cast<std::uint32_t>(code);
  (void)detail::dirwire::send(conns_[i].fd, a);
  drop(i);
}

inline bool Directory::take_hello(Conn& c) noexcept {
  unsigned char buf[wire::header_size + 8 + LEMSG_MAX_PROTOCOL_ID];
  std::size_t len = 0;
  int rfd = -1;
  Result r = detail::recv_datagram(c.fd, buf, sizeof buf, len, rfd);
  if (r == Result::WouldBlock) return true;
  if (rfd >= 0) {
    ::close(rfd);
    return false;
  }
  wire::Header h;
  if (r != Result::Ok || wire::decode(buf, len, 0, h) != Result::Ok || h.type != wire::FrameType::Hello) return false;
  std::uint32_t max = 0, idlen = 0;
  std::memcpy(&max, buf + wire::header_size, 4);
  std::memcpy(&idlen, buf + wire::header_size + 4, 4);
  if (idlen != h.length - 8 || idlen > LEMSG_MAX_PROTOCOL_ID ||
      std::memchr(buf + wire::header_size + 8, 0, idlen) != nullptr)
    return false;
  std::memcpy(c.hello_id, buf + wire::header_size + 8, idlen);
  c.hello_id[idlen] = '\0';
  c.hello_max = max;
  c.has_hello = true;
  return true;
}

inline int Directory::find_service(const char* name) const noexcept {
  for (std::size_t i = 0; i < slots; ++i)
    if (conns_[i].role == Role::Server && std::strcmp(conns_[i].req.name, name) == 0) return static_cast<int>(i);
  return -1;
}

inline void Directory::on_conn(std::size_t i) noexcept {
  Conn& c = conns_[i];
  if (c.role == Role::Waiting) {
    // A waiting client may send one thing: its hello, which belongs to the
    // server. It is read out of the socket (so the socket's queue holds
    // nothing the directory has not seen: an fd passed there, the client's
    // own socket say, would keep a dead client's connection alive) and
    // travels with the hand-over. Anything else, or the hang-up, ends the
    // wait.
    if (!c.has_hello && take_hello(c)) return;
    LEMSG_LOG(Debug, "directory: uid %u stopped waiting for %s", static_cast<unsigned>(c.creds.uid), c.req.name);
    drop(i);
    return;
  }
  detail::dirwire::Record r;
  int fd = -1;
  const Result got = detail::dirwire::recv(c.fd, r, fd);
  if (got == Result::WouldBlock) return;
  if (fd >= 0) {
    ::close(fd);  // nobody sends the directory an fd
    LEMSG_LOG(Warning, "directory: uid %u sent an fd; closing", static_cast<unsigned>(c.creds.uid));
    drop(i);
    return;
  }
  if (c.role != Role::New || got != Result::Ok) {
    // A server or a waiting client says nothing more: this is its end (or a
    // bad frame, which ends it too).
    if (c.role == Role::Server)
      LEMSG_LOG(Info, "directory: service %s (uid %u) unregistered: %s", c.req.name,
                static_cast<unsigned>(c.creds.uid), got == Result::Ok ? "unexpected frame" : to_string(got));
    else if (got != Result::Closed)
      LEMSG_LOG(Warning, "directory: uid %u: %s; closing", static_cast<unsigned>(c.creds.uid),
                got == Result::Ok ? "unexpected frame" : to_string(got));
    drop(i);
    return;
  }
  --new_;
  c.role = Role::Free;  // until request() gives it a role; counted nowhere meanwhile
  c.req = r;
  request(i, r);
}

// Connection `i`, counted in no role, asks `r`.
inline void Directory::request(std::size_t i, const detail::dirwire::Record& r) noexcept {
  Conn& c = conns_[i];
  namespace dw = detail::dirwire;
  auto refuse = [&](Result why) {
    c.role = Role::Waiting;  // counted as a waiting client so drop() keeps the books
    ++waiting_;
    answer(i, why);
  };
  if (r.op == dw::Register) {
    Result why = Result::Ok;
    if (!r.name[0] || !r.text[0]) why = Result::BadParameter;
    else if (find_service(r.name) >= 0) why = Result::Duplicate;
    else if (servers_ >= LEMSG_DIR_MAX_SERVICES) why = Result::RegistryFull;
    for (std::size_t b = 0; why == Result::Ok && b < bindings_.size(); ++b)
      if (std::strcmp(bindings_[b].service, r.name) == 0 && bindings_[b].server_uid != c.creds.uid)
        why = Result::NotPermitted;  // bound to another user's service: no squatting
    if (why != Result::Ok) {
      LEMSG_LOG(Warning, "directory: uid %u may not register %s: %s", static_cast<unsigned>(c.creds.uid), r.name,
                to_string(why));
      dw::Record a;
      a.op = dw::Registered;
      a.a = static_cast<std::uint32_t>(why);
      (void)dw::send(c.fd, a);
      c.role = Role::Waiting;
      ++waiting_;
      drop(i);
      return;
    }
    c.role = Role::Server;
    ++servers_;
    dw::Record a;
    a.op = dw::Registered;
    if (dw::send(c.fd, a) != Result::Ok) {
      drop(i);
      return;
    }
    LEMSG_LOG(Info, "directory: service %s registered by uid %u pid %ld", r.name, static_cast<unsigned>(c.creds.uid),
              static_cast<long>(c.creds.pid));
    resolve_waiting();
    return;
  }
  if (r.op == dw::List) {
    std::uint32_t n = 0;
    auto entry = [&](dw::Record& e) {
      e.op = dw::Entry;
      if (dw::send(c.fd, e) == Result::Ok) ++n;
    };
    for (const Conn& k : conns_) {
      if (k.role != Role::Server && k.role != Role::Waiting) continue;
      dw::Record e;
      e.flags = k.role == Role::Server ? dw::KindService : dw::KindWaiting;
      e.a = static_cast<std::uint32_t>(k.creds.uid);
      e.b = static_cast<std::uint32_t>(k.creds.pid);
      e.c = k.role == Role::Server ? k.req.a : 0;
      std::memcpy(e.name, k.req.name, sizeof e.name);
      if (k.role == Role::Server) std::memcpy(e.text, k.req.text, sizeof e.text);
      entry(e);
    }
    for (std::size_t b = 0; b < bindings_.size(); ++b) {
      dw::Record e;
      e.flags = dw::KindBinding;
      e.a = static_cast<std::uint32_t>(bindings_[b].client_uid);
      e.b = static_cast<std::uint32_t>(bindings_[b].server_uid);
      dw::set_text(e.name, sizeof e.name, bindings_[b].iface);
      dw::set_text(e.text, sizeof e.text, bindings_[b].service);
      entry(e);
    }
    dw::Record end;
    end.op = dw::End;
    end.a = n;
    (void)dw::send(c.fd, end);
    c.role = Role::Waiting;
    ++waiting_;
    drop(i);
    return;
  }
  if ((r.op != dw::Open && r.op != dw::Connect) || !r.name[0]) {
    LEMSG_LOG(Warning, "directory: uid %u sent a bad request; closing", static_cast<unsigned>(c.creds.uid));
    refuse(Result::BadParameter);
    return;
  }
  if (resolve(i, (r.flags & dw::FlagWait) != 0)) return;
  // It waits: for a binding, or for its server.
  const std::size_t share = (LEMSG_DIR_MAX_WAITING + 1) / 2;
  if (waiting_ >= LEMSG_DIR_MAX_WAITING || (c.creds.uid != 0 && count(Role::Waiting, c.creds.uid) >= share)) {
    LEMSG_LOG(Warning, "directory: uid %u cannot wait for %s: %s", static_cast<unsigned>(c.creds.uid), r.name,
              to_string(Result::WaitTableFull));
    refuse(Result::WaitTableFull);
    return;
  }
  c.role = Role::Waiting;
  ++waiting_;
  LEMSG_LOG(Debug, "directory: uid %u waits for %s", static_cast<unsigned>(c.creds.uid), r.name);
}

inline bool Directory::resolve(std::size_t i, bool may_wait) noexcept {
  Conn& c = conns_[i];
  namespace dw = detail::dirwire;
  const bool counted = c.role == Role::Waiting;
  auto finish = [&](Result why) {
    if (!counted) {
      c.role = Role::Waiting;
      ++waiting_;
    }
    answer(i, why);
    return true;
  };
  if (c.req.op == dw::Connect) {
    const int s = find_service(c.req.name);
    if (s < 0) return may_wait ? false : finish(Result::NotFound);
    if (c.req.flags & dw::FlagProbe) return finish(Result::Ok);
    if (c.creds.uid != 0 && c.creds.uid != conns_[s].creds.uid) return finish(Result::NotPermitted);
    if (!counted) {
      c.role = Role::Waiting;
      ++waiting_;
    }
    hand_over(i, static_cast<std::size_t>(s));
    return true;
  }
  const Binding* b = bindings_.find(c.creds.uid, c.req.name);
  int s = b ? find_service(b->service) : -1;
  if (s >= 0 && conns_[s].creds.uid != b->server_uid) s = -1;  // another user's service of that name
  if (s < 0) {
    if (may_wait) return false;
    if (!b)
      LEMSG_LOG(Info, "directory: uid %u asked for %s: not bound", static_cast<unsigned>(c.creds.uid), c.req.name);
    return finish(b ? Result::NotFound : Result::NotPermitted);
  }
  if (!counted) {
    c.role = Role::Waiting;
    ++waiting_;
  }
  hand_over(i, static_cast<std::size_t>(s));
  return true;
}

inline void Directory::resolve_waiting() noexcept {
  for (std::size_t i = 0; i < slots; ++i)
    if (conns_[i].role == Role::Waiting) (void)resolve(i, true);
}

inline void Directory::hand_over(std::size_t i, std::size_t server) noexcept {
  namespace dw = detail::dirwire;
  Conn& c = conns_[i];
  const Conn& s = conns_[server];
  dw::Record a;
  a.op = dw::Answer;
  a.b = static_cast<std::uint32_t>(s.creds.pid);
  a.c = static_cast<std::uint32_t>(s.creds.uid);
  a.d = static_cast<std::uint32_t>(s.creds.gid);
  if (dw::send(c.fd, a) != Result::Ok) {  // the client is gone
    drop(i);
    return;
  }
  dw::Record h;
  h.op = dw::HandOff;
  h.a = static_cast<std::uint32_t>(c.creds.pid);
  h.b = static_cast<std::uint32_t>(c.creds.uid);
  h.c = static_cast<std::uint32_t>(c.creds.gid);
  if (c.has_hello) {  // read out of the socket while it waited: it goes along
    h.flags = dw::FlagHello;
    h.d = c.hello_max;
    dw::set_text(h.text, sizeof h.text, c.hello_id);
  }
  const Result r = dw::send(s.fd, h, c.fd);
  if (r != Result::Ok) {
    // The client was told Ok: closing it now makes it ask again.
    LEMSG_LOG(Warning, "directory: cannot hand uid %u over to %s: %s", static_cast<unsigned>(c.creds.uid), s.req.name,
              to_string(r));
    drop(i);
    if (r == Result::Closed) drop(server);
    return;
  }
  ++handed_;
  LEMSG_LOG(Debug, "directory: uid %u pid %ld handed over to %s", static_cast<unsigned>(c.creds.uid),
            static_cast<long>(c.creds.pid), s.req.name);
  drop(i);
}

inline void Directory::reschedule() noexcept {
  std::int64_t next = 0;
  for (const Conn& c : conns_)
    if (c.role == Role::New && (!next || c.deadline < next)) next = c.deadline;
  Result r = next ? loop_.arm_timer(timer_, static_cast<std::uint32_t>(detail::ms_until(next)))
                  : loop_.disarm_timer(timer_);
  (void)r;
}

inline void Directory::on_timer() noexcept {
  if (listen_fd_ >= 0) {
    Result r = loop_.set_events(listen_watch_, Readable);  // after running out of fds
    (void)r;
  }
  const std::int64_t now = detail::now_ns();
  for (std::size_t i = 0; i < slots; ++i) {
    if (conns_[i].role == Role::New && conns_[i].deadline <= now) {
      LEMSG_LOG(Warning, "directory: uid %u said nothing in time; closing", static_cast<unsigned>(conns_[i].creds.uid));
      drop(i);
    }
  }
  reschedule();
}

}  // namespace lemsg

#undef LEMSG_DETAIL_RESULTS

#endif  // LEMSG_HPP

// -----------------------------------------------------------------------------
// lemsg is released under the MIT licence.
//
// Copyright (c) 2026 the lemsg developers
//
// Permission is hereby granted, free of charge, to any person obtaining a copy
// of this software and associated documentation files (the "Software"), to deal
// in the Software without restriction, including without limitation the rights
// to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
// copies of the Software, and to permit persons to whom the Software is
// furnished to do so, subject to the following conditions:
//
// The above copyright notice and this permission notice shall be included in
// all copies or substantial portions of the Software.
//
// THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
// IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
// FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
// AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
// LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
// OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OF THE SOFTWARE.
// -----------------------------------------------------------------------------
