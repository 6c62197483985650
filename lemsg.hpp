// lemsg.hpp - messaging between processes on one embedded Linux device.
// Version 0.1.0. Single header, C++17, no heap after initialisation, poll().
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
//                             session plus one; a Session one, two while waiting).
//   LEMSG_MAX_TIMERS      32  timers one Loop holds (each Service and Session: one).
//   LEMSG_MAX_POSTED      64  functions queued by Loop::post() and not yet run.
//   LEMSG_MAX_SESSIONS    64  sessions one Service holds; more: SessionTableFull.
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
//   LEMSG_CALLABLE_SIZE   4 pointers  bytes a handler may capture in place;
//                             a larger capture is a compile-time error.
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
//              track(RefMap) for per-client clean-up.
//   Session    client end: open (async, waits for the server), open_sync,
//              try_open, send, request, request_sync, reconnect with backoff.
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
// they return WouldDeadlock instead of blocking.
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
// LEMSG_LOG_LEVEL 3 (or set_log_level(LogLevel::Debug)) the library logs each
// decision; a refused client or a bad frame is logged as a warning.
//   - open_sync returns Timeout: is the server advertising under the same
//     runtime dir (LEMSG_RUNTIME_DIR) and name? ls the runtime dir.
//   - NotPermitted: the socket file's mode/owner, or the allow-list.
//   - ProtocolMismatch / SizeMismatch: client and server were built against
//     different protocol declarations.
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
//   8. Messaging                    >>messaging
//   (9 typed interfaces and 10 the service directory are not written yet.)

#ifndef LEMSG_HPP
#define LEMSG_HPP

#define LEMSG_VERSION_MAJOR 0
#define LEMSG_VERSION_MINOR 1
#define LEMSG_VERSION_PATCH 0
#define LEMSG_VERSION_STR "0.1.0"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
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
#define LEMSG_CALLABLE_SIZE (4 * sizeof(void*))
#endif
#ifndef LEMSG_LOG_LEVEL
#define LEMSG_LOG_LEVEL 1
#endif
#ifndef LEMSG_MAX_SESSIONS
#define LEMSG_MAX_SESSIONS 64
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

static_assert(LEMSG_MAX_WATCHES >= 1 && LEMSG_MAX_WATCHES <= 4096, "LEMSG_MAX_WATCHES must be 1..4096");
static_assert(LEMSG_MAX_TIMERS >= 1 && LEMSG_MAX_TIMERS <= 4096, "LEMSG_MAX_TIMERS must be 1..4096");
static_assert(LEMSG_MAX_POSTED >= 1 && LEMSG_MAX_POSTED <= 65536, "LEMSG_MAX_POSTED must be 1..65536");
static_assert(LEMSG_CALLABLE_SIZE >= sizeof(void*), "LEMSG_CALLABLE_SIZE must hold at least one pointer");
static_assert(LEMSG_LOG_LEVEL >= 0 && LEMSG_LOG_LEVEL <= 3, "LEMSG_LOG_LEVEL must be 0..3");
static_assert(LEMSG_MAX_SESSIONS >= 1 && LEMSG_MAX_SESSIONS <= 4096, "LEMSG_MAX_SESSIONS must be 1..4096");
static_assert(LEMSG_MAX_PENDING >= 1 && LEMSG_MAX_PENDING <= 65536, "LEMSG_MAX_PENDING must be 1..65536");
static_assert(LEMSG_MAX_OUTGOING >= 1 && LEMSG_MAX_OUTGOING <= 4096, "LEMSG_MAX_OUTGOING must be 1..4096");
static_assert(LEMSG_MAX_DEFERRED >= 1 && LEMSG_MAX_DEFERRED <= 4096, "LEMSG_MAX_DEFERRED must be 1..4096");
static_assert(LEMSG_MAX_SERVICES >= 1 && LEMSG_MAX_SERVICES <= 1024, "LEMSG_MAX_SERVICES must be 1..1024");
static_assert(LEMSG_MAX_TRACKED >= 1 && LEMSG_MAX_TRACKED <= 64, "LEMSG_MAX_TRACKED must be 1..64");
static_assert(LEMSG_MAX_NAME >= 1 && LEMSG_MAX_NAME <= 64, "LEMSG_MAX_NAME must be 1..64");
static_assert(LEMSG_MAX_PROTOCOL_ID >= 1 && LEMSG_MAX_PROTOCOL_ID <= 256, "LEMSG_MAX_PROTOCOL_ID must be 1..256");
static_assert(LEMSG_OPEN_TIMEOUT_MS >= 1, "LEMSG_OPEN_TIMEOUT_MS must be positive");

namespace lemsg {

/// Log levels, for LEMSG_LOG, set_log_level() and the sink.
enum class LogLevel : int { Error = 0, Warning = 1, Info = 2, Debug = 3 };

/// Where formatted log lines go. The line has no trailing newline. Called on
/// whichever thread logged; keep it short and thread-safe.
using LogSink = void (*)(LogLevel level, const char* line, void* ctx);

/// Sends log lines to `sink` (nullptr restores stderr). Call at start-up,
/// before other threads log.
inline void set_log_sink(LogSink sink, void* ctx) noexcept;

/// Lines above `level` are dropped. Default LEMSG_LOG_LEVEL.
inline void set_log_level(LogLevel level) noexcept;

// -- implementation --

namespace detail {

struct LogState {
  LogSink sink = nullptr;
  void* ctx = nullptr;
  std::atomic<int> level{LEMSG_LOG_LEVEL};
};
inline LogState& log_state() noexcept {
  static LogState state;
  return state;
}

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
inline void
log_printf(LogLevel level, const char* fmt, ...) noexcept {
  LogState& st = log_state();
  if (static_cast<int>(level) > st.level.load(std::memory_order_relaxed)) return;
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
  X(NotFound, "not found (stale, forged or unknown reference)")                \
  X(NoMemory, "reference table full (raise the RefMap's N)")                   \
  X(PoolEmpty, "pool empty (raise the pool's block count)")                    \
  X(NotPoolBlock, "pointer is not a block of this pool")                       \
  X(DoubleFree, "pool block released more times than referenced")             \
  X(WatchTableFull, "watch table full (raise LEMSG_MAX_WATCHES)")              \
  X(TimerTableFull, "timer table full (raise LEMSG_MAX_TIMERS)")               \
  X(QueueFull, "post queue full (raise LEMSG_MAX_POSTED)")                     \
  X(Timeout, "timed out")                                                      \
  X(SystemError, "system call failed (errno in the log)")                      \
  X(NotPermitted, "not permitted (socket file mode or the service's allow-list)") \
  X(Closed, "session closed")                                                  \
  X(ProtocolMismatch, "client and server protocol ids differ")                 \
  X(SizeMismatch, "client and server maximum payload sizes differ")            \
  X(WouldDeadlock, "only this thread's own loop could answer this synchronous call") \
  X(Duplicate, "already exists (the name is served by another live server)")   \
  X(Busy, "busy (already open, opening or advertised; or the server's backlog is full)") \
  X(SessionTableFull, "session table full (raise LEMSG_MAX_SESSIONS)")         \
  X(PendingTableFull, "pending request table full (raise LEMSG_MAX_PENDING)")  \
  X(Overflow, "peer is not reading: send queue full (raise LEMSG_MAX_OUTGOING)") \
  X(BadFrame, "peer sent a malformed frame")                                   \
  X(TooLarge, "payload larger than the protocol's maximum")                    \
  X(WouldBlock, "operation would block")                                       \
  X(Unanswered, "the server released the request without responding")        \
  X(ServiceTableFull, "this process's service table is full (raise LEMSG_MAX_SERVICES)") \
  X(TrackTableFull, "tracked map table full (raise LEMSG_MAX_TRACKED)")       \
  X(Reentrant, "called from inside a handler of the same loop (run, run_once and dispatch do not nest)")

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

  /// Bytes of `meta` init() needs for `count` blocks, in uint32_t units.
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
template <typename Sig, std::size_t Size = LEMSG_CALLABLE_SIZE>
class Callable;

template <typename R, typename... A, std::size_t Size>
class Callable<R(A...), Size> {
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
      case Op::Copy: ::new (dst) Fn(*static_cast<const Fn*>(src)); break;
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

  RefMapBase(Slot* slots, std::size_t capacity, std::uint32_t max_gen) noexcept;

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
/// add(): Ok, BadParameter for nullptr, or NoMemory when the table is full (raise N).
template <typename T, std::size_t N, std::uint32_t MaxGeneration = detail::max_generation_for(N)>
class RefMap : public RefMapBase {
  static_assert(N >= 1 && N <= (std::size_t{1} << 24), "RefMap capacity must be 1..2^24");
  static_assert(MaxGeneration >= 1 && MaxGeneration <= detail::max_generation_for(N),
                "RefMap MaxGeneration must fit beside the slot index in 32 bits");

 public:
  RefMap() noexcept : RefMapBase(slots_, N, MaxGeneration) {}

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

// -- implementation --

inline std::uint32_t RefMapBase::next_key() noexcept {
  // Every map gets its own key; the odd multiplier spreads consecutive
  // counters over all 32 bits, so two maps' references decode differently.
  static std::atomic<std::uint32_t> counter{0x5eed};
  std::uint32_t k = counter.fetch_add(1, std::memory_order_relaxed) * 0x9E3779B1u;
  return k ^ (k >> 15);
}

inline RefMapBase::RefMapBase(Slot* slots, std::size_t capacity, std::uint32_t max_gen) noexcept
    : slots_(slots),
      capacity_(capacity),
      max_gen_(max_gen),
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
    if (gen > max_gen_ || gen <= s.gen) {
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

namespace wire {

/// Bytes in a frame header.
constexpr std::size_t header_size = 16;
constexpr std::uint8_t magic = 0xE5;
constexpr std::uint8_t version = 1;

enum class FrameType : std::uint8_t { Hello = 1, Welcome, Refuse, Message, Request, Response };

enum : std::uint8_t { FlagFd = 1u << 0, FlagError = 1u << 1 };

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
/// the handler that is running stays valid until it returns (it runs from a
/// copy).
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
  /// BadParameter when `count` does not match that fill; Reentrant from
  /// inside one of this loop's handlers (nothing is dispatched).
  Result dispatch(const struct pollfd* fds, std::size_t count) noexcept;

  /// True on the thread that constructed the loop or last ran it.
  /// Any thread may ask (the messaging layer asks from a caller's thread).
  bool on_owner_thread() const noexcept {
    return pthread_equal(owner_.load(std::memory_order_relaxed), pthread_self()) != 0;
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
    WatchHandler handler;
  };
  struct Timer {
    std::int64_t deadline_ns = 0;
    std::int64_t period_ns = 0;
    std::uint64_t seq = 0;  // arming order, breaks deadline ties
    bool armed = false;
    bool used = false;
    TimerHandler handler;
  };

  static std::int64_t now_ns() noexcept;
  bool dispatch_fds(const struct pollfd* fds, std::size_t count) noexcept;
  bool dispatch_timers() noexcept;
  bool dispatch_posted() noexcept;

  Watch watches_[LEMSG_MAX_WATCHES];
  RefMap<Watch, LEMSG_MAX_WATCHES> watch_refs_;
  Timer timers_[LEMSG_MAX_TIMERS];
  RefMap<Timer, LEMSG_MAX_TIMERS> timer_refs_;
  std::uint64_t arm_seq_ = 0;

  // Snapshot from the last fill: which watch each pollfd entry belongs to.
  struct pollfd pfds_[LEMSG_MAX_WATCHES + 1];
  std::uint32_t filled_[LEMSG_MAX_WATCHES + 1];
  std::size_t filled_count_ = 0;

  int wake_fd_ = -1;
  detail::Mutex post_mutex_;
  PostedFn posted_[LEMSG_MAX_POSTED];
  std::size_t post_head_ = 0;
  std::size_t post_count_ = 0;  // guarded by post_mutex_
  std::atomic<int> posted_pending_{0};
  bool posted_ran_ = false;  // the queue already ran in this dispatch
  std::atomic<int> stop_{0};
  std::atomic<pthread_t> owner_{pthread_self()};  // run_once writes it, any thread reads it
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

inline std::int64_t Loop::now_ns() noexcept {
  struct timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
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
    return Result::Ok;
  }
  return Result::WatchTableFull;
}

inline Result Loop::set_events(WatchId id, short events) noexcept {
  if ((events & ~(Readable | Writable)) != 0) return Result::BadParameter;
  Watch* w = watch_refs_.lookup(id.value);
  if (!w) return Result::NotFound;
  w->events = events;
  return Result::Ok;
}

inline Result Loop::remove_watch(WatchId id) noexcept {
  Watch* w = watch_refs_.lookup(id.value);
  if (!w) return Result::NotFound;
  Result r = watch_refs_.remove(id.value);
  w->used = false;
  w->fd = -1;
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
  t->deadline_ns = now_ns() + static_cast<std::int64_t>(delay_ms) * 1000000;
  t->period_ns = static_cast<std::int64_t>(period_ms) * 1000000;
  t->seq = ++arm_seq_;
  t->armed = true;
  return Result::Ok;
}

inline Result Loop::disarm_timer(TimerId id) noexcept {
  Timer* t = timer_refs_.lookup(id.value);
  if (!t) return Result::NotFound;
  t->armed = false;
  return Result::Ok;
}

inline Result Loop::remove_timer(TimerId id) noexcept {
  Timer* t = timer_refs_.lookup(id.value);
  if (!t) return Result::NotFound;
  Result r = timer_refs_.remove(id.value);
  t->used = false;
  t->armed = false;
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
  std::size_t n = 0;
  if (wake_fd_ >= 0) {
    fds[n] = pollfd{wake_fd_, POLLIN, 0};
    filled_[n++] = 0;  // 0 marks the wake-up fd
  }
  watch_refs_.for_each([&](Watch* w, std::uint32_t ref) {
    fds[n] = pollfd{w->fd, w->events, 0};
    filled_[n++] = ref;
  });
  filled_count_ = n;
  return Result::Ok;
}

inline int Loop::next_timeout_ms() const noexcept {
  if (posted_pending_.load(std::memory_order_relaxed)) return 0;
  bool found = false;
  std::int64_t earliest = 0;
  timer_refs_.for_each([&](const Timer* t, std::uint32_t) {
    if (t->armed && (!found || t->deadline_ns < earliest)) {
      earliest = t->deadline_ns;
      found = true;
    }
  });
  if (!found) return -1;
  const std::int64_t left = earliest - now_ns();
  if (left <= 0) return 0;
  // Round up so poll() never wakes just before the deadline and spins.
  const std::int64_t ms = (left + 999999) / 1000000;
  return ms > INT32_MAX ? INT32_MAX : static_cast<int>(ms);
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
    // Run from a copy: the handler may remove its own watch, which destroys
    // the stored callable.
    WatchHandler h = w->handler;
    h(w->fd, rev);
    any = true;
    if ((rev & POLLNVAL) && watch_refs_.lookup(filled_[i]) == w) {
      LEMSG_LOG(Warning, "loop: fd %d is closed but still watched; removing the watch", w->fd);
      Result r = remove_watch(WatchId{filled_[i]});
      (void)r;
    }
  }
  return any;
}

inline bool Loop::dispatch_timers() noexcept {
  const std::int64_t now = now_ns();
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
    TimerHandler h = due->handler;
    (void)due_ref;
    h();
    any = true;
  }
  return any;
}

inline Result Loop::dispatch(const struct pollfd* fds, std::size_t count) noexcept {
  if (dispatching_) return Result::Reentrant;
  if (count != filled_count_ || (count > 0 && fds == nullptr)) return Result::BadParameter;
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
  filled_count_ = 0;
  dispatching_ = false;
  return any ? Result::Ok : Result::Timeout;
}

inline Result Loop::run_once(int timeout_ms) noexcept {
  if (dispatching_) return Result::Reentrant;
  owner_.store(pthread_self(), std::memory_order_relaxed);
  std::size_t n = 0;
  Result r = fill_pollfds(pfds_, LEMSG_MAX_WATCHES + 1, n);
  if (r != Result::Ok) return r;
  int wait = next_timeout_ms();
  if (timeout_ms >= 0 && (wait < 0 || timeout_ms < wait)) wait = timeout_ms;
  const int rc = ::poll(pfds_, static_cast<nfds_t>(n), wait);
  if (rc < 0) {
    if (errno != EINTR) {
      LEMSG_LOG(Error, "loop: poll failed: %s", std::strerror(errno));
      filled_count_ = 0;
      return Result::SystemError;
    }
    for (std::size_t i = 0; i < n; ++i) pfds_[i].revents = 0;
  }
  return dispatch(pfds_, n);
}

inline Result Loop::run() noexcept {
  if (dispatching_) return Result::Reentrant;
  while (!stop_.load(std::memory_order_acquire)) {
    Result r = run_once(-1);
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

namespace detail {

/// A socket path: runtime dir + "/" + name. Names are 1..LEMSG_MAX_NAME
/// characters of [A-Za-z0-9._-], not starting with '.'. BadParameter for a
/// bad name or a path longer than sun_path.
inline Result socket_path(const char* name, char (&out)[sizeof(sockaddr_un::sun_path)]) noexcept;

/// Creates, binds (under a temporary name, then renamed into place so no
/// client ever sees the file before its mode is set) and listens. A socket
/// file that no process listens on is replaced; one that answers, or whose
/// backlog is full, is a Duplicate; one we may not connect to is left alone
/// (NotPermitted). Ok with `fd` set, Duplicate, NotPermitted, BadParameter
/// (the path plus a temporary suffix does not fit), SystemError.
inline Result listen_at(const char* path, mode_t mode, int& fd) noexcept;

/// Connects a non-blocking socket to `path`. Ok with `fd` set; NotFound when
/// nothing listens (no file, or a stale one); NotPermitted when the file's
/// mode refuses us; Busy when the server's backlog is full; SystemError.
inline Result connect_to(const char* path, int& fd) noexcept;

/// Credentials of the peer of a connected socket.
inline Result peer_credentials(int fd, Credentials& out) noexcept;

/// True when `fd` refers to a directory.
inline bool is_directory(int fd) noexcept;

/// Puts a connected socket in blocking mode (true on success). Callers then
/// pass MSG_DONTWAIT wherever they must not wait.
inline bool clear_nonblock(int fd) noexcept;

/// Sends one datagram, with `pass_fd` (>= 0) attached. Ok, WouldBlock,
/// Closed (peer gone), SystemError. Never raises SIGPIPE.
inline Result send_datagram(int fd, const void* buf, std::size_t len, int pass_fd) noexcept;

/// Receives one datagram into `buf` (capacity `cap`). Ok with `len` and
/// `fd_out` (-1 when none) set; WouldBlock; Closed (orderly end or reset,
/// once the datagrams the peer sent before it are read); TooLarge (datagram
/// longer than `cap`); BadFrame (an empty datagram, control data truncated,
/// more than one fd, or a directory fd). On every result but Ok, each fd that
/// arrived has been closed already. With `wait` on a blocking socket it waits
/// for a datagram up to the socket's SO_RCVTIMEO (then WouldBlock).
inline Result recv_datagram(int fd, void* buf, std::size_t cap, std::size_t& len, int& fd_out,
                            bool wait = false) noexcept;

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

inline Result socket_path(const char* name, char (&out)[sizeof(sockaddr_un::sun_path)]) noexcept {
  if (name == nullptr || name[0] == '\0' || name[0] == '.') return Result::BadParameter;
  std::size_t n = 0;
  for (; name[n]; ++n) {
    const char c = name[n];
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                    c == '_' || c == '-';
    if (!ok || n >= LEMSG_MAX_NAME) return Result::BadParameter;
  }
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

inline Result listen_at(const char* path, mode_t mode, int& fd) noexcept {
  fd = -1;
  int probe = -1;
  const Result live = connect_to(path, probe);
  if (live == Result::Ok) {
    ::close(probe);
    return Result::Duplicate;
  }
  // Only a missing or refusing (stale) file may be replaced: a full backlog
  // is a live server, and a file we may not connect to cannot be probed.
  if (live == Result::Busy) return Result::Duplicate;
  if (live == Result::NotPermitted) return Result::NotPermitted;
  char tmp[sizeof(sockaddr_un::sun_path)];
  const int w = std::snprintf(tmp, sizeof tmp, "%s.%ld.tmp", path, static_cast<long>(::getpid()));
  if (w < 0 || static_cast<std::size_t>(w) >= sizeof tmp) return Result::BadParameter;
  sockaddr_un sa;
  socklen_t len;
  if (!fill_address(tmp, sa, len)) return Result::BadParameter;
  const int s = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (s < 0) return Result::SystemError;
  ::unlink(tmp);
  Result r = Result::Ok;
  if (::bind(s, reinterpret_cast<const sockaddr*>(&sa), len) < 0) {
    r = (errno == EACCES || errno == EPERM || errno == EROFS) ? Result::NotPermitted : Result::SystemError;
    LEMSG_LOG(Error, "transport: bind %s failed: %s", tmp, std::strerror(errno));
  } else if (::chmod(tmp, mode) < 0 || ::listen(s, 64) < 0 || ::rename(tmp, path) < 0) {
    r = (errno == EACCES || errno == EPERM) ? Result::NotPermitted : Result::SystemError;
    LEMSG_LOG(Error, "transport: publishing %s failed: %s", path, std::strerror(errno));
    ::unlink(tmp);
  }
  if (r != Result::Ok) {
    ::close(s);
    return r;
  }
  fd = s;
  return Result::Ok;
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

inline Result check_datagram(int fd, struct msghdr& mh, ssize_t n, std::size_t& len, int& fd_out) noexcept;

inline bool clear_nonblock(int fd) noexcept {
  const int fl = ::fcntl(fd, F_GETFL);
  return fl >= 0 && ::fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) == 0;
}

inline bool is_directory(int fd) noexcept {
  struct stat st;
  return ::fstat(fd, &st) == 0 && S_ISDIR(st.st_mode);
}

inline Result send_datagram(int fd, const void* buf, std::size_t len, int pass_fd) noexcept {
  struct iovec iov;
  iov.iov_base = const_cast<void*>(buf);
  iov.iov_len = len;
  struct msghdr mh;
  std::memset(&mh, 0, sizeof mh);
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  alignas(struct cmsghdr) unsigned char control[CMSG_SPACE(sizeof(int))];
  if (pass_fd >= 0) {
    std::memset(control, 0, sizeof control);
    mh.msg_control = control;
    mh.msg_controllen = sizeof control;
    struct cmsghdr* c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &pass_fd, sizeof(int));
  }
  for (;;) {
    const ssize_t n = ::sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n >= 0) return Result::Ok;  // SEQPACKET sends whole datagrams or nothing
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return Result::WouldBlock;
    if (errno == EPIPE || errno == ECONNRESET || errno == ENOTCONN) return Result::Closed;
    if (errno == EMSGSIZE) return Result::TooLarge;
    LEMSG_LOG(Error, "transport: sendmsg failed: %s", std::strerror(errno));
    return Result::SystemError;
  }
}

inline Result recv_datagram(int fd, void* buf, std::size_t cap, std::size_t& len, int& fd_out, bool wait) noexcept {
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
  return check_datagram(fd, mh, n, len, fd_out);
}

inline Result check_datagram(int fd, struct msghdr& mh, ssize_t n, std::size_t& len, int& fd_out) noexcept {
  len = 0;
  fd_out = -1;
  int fds[4];
  std::size_t nfds = 0;
  bool bad_control = (mh.msg_flags & MSG_CTRUNC) != 0;
  for (struct cmsghdr* c = CMSG_FIRSTHDR(&mh); c != nullptr; c = CMSG_NXTHDR(&mh, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) {
      bad_control = true;
      continue;
    }
    const std::size_t bytes = c->cmsg_len > CMSG_LEN(0) ? c->cmsg_len - CMSG_LEN(0) : 0;
    for (std::size_t i = 0; i < bytes / sizeof(int) && nfds < 4; ++i)
      std::memcpy(&fds[nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
  }
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
// 8. Messaging                                                     >>messaging
// =============================================================================
//
// The Legato model on Unix sockets, with no daemon ("direct mode"):
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
  Service* service;  // the Service a request arrived at
  std::uint32_t session;
  std::uint32_t txn;
  std::uint32_t size;
  std::int32_t status;  // Result carried by an error response
  int fd;
  MsgKind kind;
  bool responded;
  alignas(8) unsigned char header[wire::header_size];
};
static_assert(offsetof(MsgBlock, header) + wire::header_size == sizeof(MsgBlock),
              "payload must follow the wire header directly");

inline unsigned char* payload_of(MsgBlock* b) noexcept { return reinterpret_cast<unsigned char*>(b) + sizeof(MsgBlock); }

struct Channel;

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

 private:
  Witness* top_ = nullptr;
};

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
  void detach(const Service* svc) noexcept;
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

/// Who may open a Service, and the socket file's mode.
struct ServiceOptions {
  mode_t mode = 0660;
  /// When either list is set, only a peer whose uid is in `uids` or whose gid
  /// is in `gids` (from SO_PEERCRED) is let in; others get NotPermitted.
  /// The arrays must outlive the advertisement.
  const uid_t* uids = nullptr;
  std::size_t uid_count = 0;
  const gid_t* gids = nullptr;
  std::size_t gid_count = 0;
};

using OpenHandler = Callable<void(SessionRef)>;
/// Server side: the session, and why it closed: Closed (client closed or
/// died), Ok (this side closed it), BadFrame or TooLarge (bad input),
/// Overflow (client stopped reading).
using CloseHandler = Callable<void(SessionRef, Result reason)>;
using ReceiveHandler = Callable<void(Message&)>;
/// Client side: why the server end went away (Closed, BadFrame, TooLarge, Overflow).
using SessionCloseHandler = Callable<void(Result reason)>;
/// Result of an open that was started with Session::open().
using OpenCallback = Callable<void(Result)>;
/// Completion of an async request: Ok with the response, or Closed, Timeout,
/// Unanswered or another error with an empty message.
using ResponseHandler = Callable<void(Result, Message&)>;
/// Releases one entry a closing session owned in a tracked RefMap.
using TrackRelease = Callable<void(void* obj, std::uint32_t ref)>;

namespace detail {

// One connected socket and its outgoing queue; shared by both ends.
struct Channel {
  int fd = -1;
  WatchId watch;
  bool starved = false;  // pool was empty: reading paused until a retry
  // The socket is in blocking mode (every loop-path call passes MSG_DONTWAIT),
  // so request_sync can wait inside recvmsg, as a plain blocking client does.
  bool blocking = false;
  int rcvtimeo_ms = 0;  // SO_RCVTIMEO last set (0 = never)
  Message out[LEMSG_MAX_OUTGOING];
  std::size_t out_head = 0;
  std::size_t out_count = 0;

  void update_events(Loop& loop) noexcept {
    short ev = starved ? 0 : Readable;
    if (out_count) ev = static_cast<short>(ev | Writable);
    Result r = loop.set_events(watch, ev);
    (void)r;
  }
  // Sends or queues the frame; on any failure `m` is left untouched.
  Result send(Loop& loop, Message& m, wire::FrameType type, std::uint32_t txn, std::uint8_t flags) noexcept;
  // Sends what is queued. Ok (maybe some left), or Closed/SystemError.
  Result flush(Loop& loop) noexcept;
  // Receives one frame into a new pool message.
  Result receive(MessagePoolBase& pool, std::uint32_t max_payload, Message& out, wire::Header& h,
                 bool wait = false) noexcept;
  // Waits at most `ms` (> 0) in the next receive(wait = true).
  bool set_wait(int ms) noexcept;

  // Frames of the last batch read with one recvmmsg(), handed out in order
  // by next(). A batch shorter than asked means the socket was empty, so the
  // next call says WouldBlock without a system call until readable() again.
  Message held[max_batch];
  wire::Header held_h[max_batch];
  std::size_t held_i = 0;
  std::size_t held_n = 0;
  Result held_err = Result::Ok;  // what ends the batch after its good frames
  bool drained = false;
  // Blocks the next batch asks for: 2 (enough to see the socket drained) after
  // a short batch, doubling up to max_batch while batches come back full.
  std::size_t want = 2;
  void readable() noexcept { drained = false; }
  bool has_held() const noexcept { return held_i < held_n || held_err != Result::Ok; }
  Result next(MessagePoolBase& pool, std::uint32_t max_payload, Message& out, wire::Header& h) noexcept;
  void reset(Loop& loop) noexcept;
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
inline Result registry_add(const char* path, const Loop* loop) noexcept;
inline void registry_remove(const char* path) noexcept;
inline bool served_by_this_thread(const char* path) noexcept;

inline std::int64_t now_ns() noexcept {
  struct timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}
inline int ms_until(std::int64_t deadline) noexcept {
  const std::int64_t left = deadline - now_ns();
  if (left <= 0) return 0;
  const std::int64_t ms = (left + 999999) / 1000000;
  return ms > INT32_MAX ? INT32_MAX : static_cast<int>(ms);
}
inline Result send_control(int fd, wire::FrameType type, std::uint32_t txn, std::uint8_t flags, const void* payload,
                           std::uint32_t len) noexcept;

}  // namespace detail

/// The server end of an interface. Owned by the caller, used on its Loop's
/// thread. At most LEMSG_MAX_SESSIONS sessions at once; a client beyond that
/// is refused with SessionTableFull.
///
/// Lifetime: create it after its Loop and pool and destroy it before them
/// (their destructors stop the program otherwise). Any handler may destroy
/// the Service (or close sessions); the library touches nothing of it
/// afterwards. A received request may outlive the Service: releasing it then
/// answers nothing (the Service's destructor closed its session anyway).
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
  /// max_payload above the pool's) or TimerTableFull otherwise. Every call
  /// below returns this error while it is not Ok.
  Result status() const noexcept { return status_; }

  /// Listens on <runtime dir>/<name>. Ok; BadParameter (name); Busy (already
  /// advertised); Duplicate (another live server has the name);
  /// NotPermitted; WatchTableFull; ServiceTableFull; SystemError.
  Result advertise(const char* name, const ServiceOptions& options = ServiceOptions{}) noexcept;
  /// Stops accepting and removes the socket file; open sessions go on. Ok or NotFound.
  Result hide() noexcept;
  bool is_advertised() const noexcept { return listen_fd_ >= 0; }

  void set_open_handler(OpenHandler h) noexcept { open_handler_ = std::move(h); }
  void set_close_handler(CloseHandler h) noexcept { close_handler_ = std::move(h); }
  void set_receive_handler(ReceiveHandler h) noexcept { receive_handler_ = std::move(h); }

  /// When a session closes (for any reason), every entry of `map` whose owner
  /// is that session's SessionRef value is removed and passed to `release`.
  /// Ok, BadParameter, or TrackTableFull (raise LEMSG_MAX_TRACKED).
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
  /// Overflow (LEMSG_MAX_OUTGOING frames already wait); Closed. On failure
  /// the message is still the caller's.
  Result send(SessionRef s, Message&& m) noexcept;
  /// Answers a request with the message's payload (and fd), consuming `m`,
  /// so a request is answered at most once. Ok; Closed when its session is
  /// gone (harmless; the message is consumed); BadParameter when `m` is empty
  /// (already responded), shared (copies exist), or not a request received
  /// here; TooLarge; Overflow when the response cannot even be queued (the
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
  struct Peer {
    detail::Channel ch;
    Credentials creds;
    void* context = nullptr;
    std::int64_t hello_deadline = 0;
    bool used = false;
    bool open = false;
    bool closing = false;
  };
  struct Tracked {
    RefMapBase* map = nullptr;
    TrackRelease release;
  };

  // Functions returning bool call user code: false means the Service was
  // destroyed meanwhile, and the caller returns without touching it.
  void on_listen(short revents) noexcept;
  void on_peer(std::uint32_t ref, short revents) noexcept;
  bool on_hello(std::uint32_t ref, Peer& p) noexcept;  // false: stop reading (or destroyed)
  void on_timer() noexcept;
  void reschedule() noexcept;
  bool close_peer(std::uint32_t ref, Result reason) noexcept;
  bool allowed(const Credentials& c) const noexcept;
  void answer_error(std::uint32_t session, std::uint32_t txn, Result code) noexcept;
  static void unanswered(Service* svc, std::uint32_t session, std::uint32_t txn) noexcept {
    svc->answer_error(session, txn, Result::Unanswered);
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
  TimerId timer_;
  char path_[sizeof(sockaddr_un::sun_path)] = {};
  Peer peers_[LEMSG_MAX_SESSIONS];
  RefMap<Peer, LEMSG_MAX_SESSIONS> peer_refs_;
  Tracked tracked_[LEMSG_MAX_TRACKED];
  detail::Lifeline life_;
};

/// The client end of an interface. Owned by the caller, used on its Loop's
/// thread. At most LEMSG_MAX_PENDING requests wait at once.
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

  /// Ok when constructed fine; BadParameter or TimerTableFull otherwise.
  Result status() const noexcept { return status_; }

  /// Starts opening: connects now if the server is there, otherwise waits
  /// (inotify on the runtime dir, no polling) until it appears. `cb` runs on
  /// the loop, never inside open(), with Ok each time the session opens
  /// (again after a reconnect), or with ProtocolMismatch, SizeMismatch or
  /// NotPermitted, which end the attempt; close() before it runs drops it.
  /// Returns Ok (started), BadParameter, Busy (not closed), or Closed when a
  /// handler run to finish an earlier loss of the server (see request_sync)
  /// destroyed the Session.
  Result open(const char* name, OpenCallback cb) noexcept;
  /// Opens, waiting at most `timeout_ms` (> 0) for the server to appear and
  /// answer; blocks the thread (the loop does not run meanwhile). Ok, Timeout,
  /// ProtocolMismatch, SizeMismatch, NotPermitted, SessionTableFull,
  /// WouldDeadlock (the server is served by this thread's loop), Busy,
  /// BadParameter, or Closed as for open() (the Session is gone).
  Result open_sync(const char* name, int timeout_ms) noexcept;
  /// One attempt: NotFound when no server listens; otherwise as open_sync
  /// with LEMSG_OPEN_TIMEOUT_MS for the server's answer (Closed included).
  Result try_open(const char* name) noexcept;
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
  /// Overflow. On failure the message is still the caller's.
  Result send(Message&& m) noexcept;
  /// Sends a request; `done` runs exactly once on the loop: Ok with the
  /// response, Closed, Timeout (after `timeout_ms`, 0 = none) or Unanswered.
  /// Returns Ok (sent or queued; consumed), Closed, BadParameter, TooLarge,
  /// Overflow or PendingTableFull (then `done` is not called and the message
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
  enum class State : std::uint8_t { Idle, Waiting, Handshake, Open, Backoff };
  struct Pending {
    ResponseHandler done;
    std::int64_t deadline = 0;  // 0 = none
    bool used = false;
  };

  // Functions returning bool call user code: false means the Session was
  // destroyed meanwhile, and the caller returns without touching it.
  Result prepare(const char* name) noexcept;
  void attempt() noexcept;
  bool watch_dir() noexcept;
  void stop_watching_dir() noexcept;
  void on_dir_event() noexcept;
  Result send_hello(int fd) const noexcept;
  Result start_handshake(int fd) noexcept;
  Result handshake_blocking(int fd, std::int64_t deadline) noexcept;
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
  bool complete_all(Result why) noexcept;
  Result check_outgoing(const Message& m) const noexcept;

  Loop& loop_;
  Protocol protocol_;
  MessagePoolBase& pool_;
  Result status_ = Result::Ok;
  State state_ = State::Idle;
  detail::Channel ch_;
  TimerId timer_;
  int dir_fd_ = -1;  // inotify
  WatchId dir_watch_;
  char path_[sizeof(sockaddr_un::sun_path)] = {};
  const char* name_ = nullptr;  // points into path_
  OpenCallback open_cb_;
  ReceiveHandler receive_handler_;
  SessionCloseHandler close_handler_;
  Credentials server_;
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
  RefMap<Pending, LEMSG_MAX_PENDING> pending_refs_;
  Message deferred_[LEMSG_MAX_DEFERRED];
  std::size_t deferred_head_ = 0;
  std::size_t deferred_count_ = 0;
  detail::Lifeline life_;
};

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
      Service::unanswered(b->service, b->session, b->txn);
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

inline void MessagePoolBase::detach(const Service* svc) noexcept {
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
  b->session = 0;
  b->txn = 0;
  b->size = 0;
  b->status = 0;
  b->fd = -1;
  b->kind = detail::MsgKind::Outgoing;
  b->responded = false;
  out.blk_ = b;
  return Result::Ok;
}

namespace detail {

inline Result registry_add(const char* path, const Loop* loop) noexcept {
  LocalRegistry& reg = local_registry();
  std::lock_guard<detail::Mutex> lock(reg.mutex);
  const pid_t me = ::getpid();
  for (LocalService& e : reg.entries) {
    // Entries a forked child inherited from its parent are free to reuse.
    if (e.loop != nullptr && e.pid == me) continue;
    std::snprintf(e.path, sizeof e.path, "%s", path);
    e.loop = loop;
    e.pid = me;
    return Result::Ok;
  }
  return Result::ServiceTableFull;
}

inline void registry_remove(const char* path) noexcept {
  LocalRegistry& reg = local_registry();
  std::lock_guard<detail::Mutex> lock(reg.mutex);
  for (LocalService& e : reg.entries)
    if (e.loop && e.pid == ::getpid() && std::strcmp(e.path, path) == 0) e.loop = nullptr;
}

inline bool served_by_this_thread(const char* path) noexcept {
  LocalRegistry& reg = local_registry();
  std::lock_guard<detail::Mutex> lock(reg.mutex);
  for (const LocalService& e : reg.entries)
    if (e.loop && e.pid == ::getpid() && std::strcmp(e.path, path) == 0 && e.loop->on_owner_thread()) return true;
  return false;
}

inline Result send_control(int fd, wire::FrameType type, std::uint32_t txn, std::uint8_t flags, const void* payload,
                           std::uint32_t len) noexcept {
  unsigned char buf[wire::header_size + 8 + LEMSG_MAX_PROTOCOL_ID];
  if (len > sizeof buf - wire::header_size) return Result::BadParameter;
  wire::encode(wire::Header{type, flags, txn, len}, buf);
  if (len) std::memcpy(buf + wire::header_size, payload, len);
  return send_datagram(fd, buf, wire::header_size + len, -1);
}

inline Result Channel::send(Loop& loop, Message& m, wire::FrameType type, std::uint32_t txn,
                            std::uint8_t flags) noexcept {
  MsgBlock* b = m.blk_;
  if (b->fd >= 0) flags = static_cast<std::uint8_t>(flags | wire::FlagFd);
  wire::encode(wire::Header{type, flags, txn, b->size}, b->header);
  if (out_count == 0) {
    const Result r = send_datagram(fd, b->header, wire::header_size + b->size, b->fd);
    if (r == Result::Ok) {
      m.release();
      return r;
    }
    if (r != Result::WouldBlock) return r;
  }
  if (out_count == LEMSG_MAX_OUTGOING) return Result::Overflow;
  out[(out_head + out_count) % LEMSG_MAX_OUTGOING] = std::move(m);
  ++out_count;
  update_events(loop);
  return Result::Ok;
}

inline Result Channel::flush(Loop& loop) noexcept {
  while (out_count) {
    Message& m = out[out_head];
    const Result r = send_datagram(fd, m.blk_->header, wire::header_size + m.blk_->size, m.blk_->fd);
    if (r == Result::WouldBlock) break;
    if (r != Result::Ok) return r;
    m.release();
    out_head = (out_head + 1) % LEMSG_MAX_OUTGOING;
    --out_count;
  }
  update_events(loop);
  return Result::Ok;
}

inline Result Channel::next(MessagePoolBase& pool, std::uint32_t max_payload, Message& out,
                            wire::Header& h) noexcept {
  if (held_i == held_n && held_err == Result::Ok && !drained) {
    held_i = held_n = 0;
    std::size_t asked = 0;
    for (; asked < want; ++asked)
      if (pool.create(held[asked]) != Result::Ok) break;
    if (asked == 0) return Result::PoolEmpty;
    Datagram d[max_batch];
    for (std::size_t i = 0; i < asked; ++i)
      d[i] = Datagram{held[i].blk_->header, wire::header_size + pool.max_payload(), 0, -1, Result::Ok};
    std::size_t got = 0;
    Result r = recv_datagrams(fd, d, asked, got);
    for (std::size_t i = 0; i < got; ++i) {
      Result ri = d[i].result;
      if (ri == Result::Ok) ri = wire::decode(held[i].blk_->header, d[i].len, max_payload, held_h[i]);
      // The fd flag must match what arrived: an fd nobody announced is refused.
      if (ri == Result::Ok && ((held_h[i].flags & wire::FlagFd) != 0) != (d[i].fd >= 0)) ri = Result::BadFrame;
      if (ri != Result::Ok || held_err != Result::Ok) {
        // Nothing after a bad frame is delivered: the session is closing.
        if (d[i].fd >= 0 && d[i].result == Result::Ok) ::close(d[i].fd);
        if (held_err == Result::Ok) held_err = ri;
        continue;
      }
      MsgBlock* b = held[i].blk_;
      b->size = held_h[i].length;
      b->fd = d[i].fd;
      b->txn = held_h[i].txn;
      if (held_h[i].flags & wire::FlagError) {
        std::memcpy(&b->status, payload_of(b), 4);
        b->size = 0;
      }
      held_n = i + 1;
    }
    for (std::size_t i = held_n; i < asked; ++i) held[i].release();
    if (r == Result::WouldBlock) drained = true;
    else if (r != Result::Ok && held_err == Result::Ok) held_err = r;
    else drained = got < asked;
    want = got < asked ? 2 : (want * 2 > max_batch ? max_batch : want * 2);
  }
  if (held_i < held_n) {
    out = std::move(held[held_i]);
    h = held_h[held_i];
    ++held_i;
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

inline Result Channel::receive(MessagePoolBase& pool, std::uint32_t max_payload, Message& out,
                               wire::Header& h, bool wait) noexcept {
  Message m;
  Result r = pool.create(m);
  if (r != Result::Ok) return r;
  std::size_t len = 0;
  int rfd = -1;
  r = recv_datagram(fd, m.blk_->header, wire::header_size + pool.max_payload(), len, rfd, wait);
  if (r != Result::Ok) return r;
  r = wire::decode(m.blk_->header, len, max_payload, h);
  // The fd flag must match what arrived: an fd nobody announced is refused.
  if (r == Result::Ok && ((h.flags & wire::FlagFd) != 0) != (rfd >= 0)) r = Result::BadFrame;
  if (r != Result::Ok) {
    if (rfd >= 0) ::close(rfd);
    return r;
  }
  m.blk_->size = h.length;
  m.blk_->fd = rfd;
  m.blk_->txn = h.txn;
  if (h.flags & wire::FlagError) {
    std::int32_t code;
    std::memcpy(&code, payload_of(m.blk_), 4);
    m.blk_->status = code;
    m.blk_->size = 0;
  }
  out = std::move(m);
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
  for (std::size_t i = 0; i < out_count; ++i) out[(out_head + i) % LEMSG_MAX_OUTGOING].release();
  out_head = out_count = 0;
  for (std::size_t i = held_i; i < held_n; ++i) held[i].release();
  held_i = held_n = 0;
  held_err = Result::Ok;
  drained = false;
  starved = false;
  blocking = false;
  rcvtimeo_ms = 0;
}

// An error code from the peer must be one we know; anything else is a bad frame.
inline bool known_result(std::int32_t code) noexcept {
  return code > 0 && code < result_count;
}

}  // namespace detail

// ---- Service ----

inline Service::Service(Loop& loop, const Protocol& protocol, MessagePoolBase& pool) noexcept
    : loop_(loop), protocol_(protocol), pool_(pool) {
  ++loop_.users_;
  ++pool_.users_;
  const std::size_t idlen = protocol.id ? std::strlen(protocol.id) : 0;
  if (idlen == 0 || idlen > LEMSG_MAX_PROTOCOL_ID || protocol.max_payload > pool.max_payload()) {
    status_ = Result::BadParameter;
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
  if (::mkdir(runtime_dir(), 0755) < 0 && errno != EEXIST) {
    LEMSG_LOG(Error, "service %s: cannot create %s: %s", name, runtime_dir(), std::strerror(errno));
    return errno == EACCES ? Result::NotPermitted : Result::SystemError;
  }
  if (detail::served_by_this_thread(path)) return Result::Duplicate;
  r = detail::registry_add(path, &loop_);
  if (r != Result::Ok) return r;
  int fd = -1;
  r = detail::listen_at(path, options.mode, fd);
  if (r == Result::Ok) {
    r = loop_.add_watch(fd, Readable, [this](int, short ev) { on_listen(ev); }, listen_watch_);
    if (r != Result::Ok) {
      ::close(fd);
      ::unlink(path);
    }
  }
  if (r != Result::Ok) {
    detail::registry_remove(path);
    return r;
  }
  std::memcpy(path_, path, sizeof path_);
  listen_fd_ = fd;
  options_ = options;
  LEMSG_LOG(Info, "service %s: advertised at %s", protocol_.id, path_);
  return Result::Ok;
}

inline Result Service::hide() noexcept {
  if (listen_fd_ < 0) return Result::NotFound;
  Result r = loop_.remove_watch(listen_watch_);
  (void)r;
  listen_watch_ = WatchId{};
  ::close(listen_fd_);
  listen_fd_ = -1;
  ::unlink(path_);
  detail::registry_remove(path_);
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
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED)
        LEMSG_LOG(Warning, "service %s: accept failed: %s", protocol_.id, std::strerror(errno));
      return;
    }
    Credentials c;
    std::int32_t refuse = 0;
    if (detail::peer_credentials(fd, c) != Result::Ok) refuse = static_cast<std::int32_t>(Result::SystemError);
    else if (!allowed(c)) refuse = static_cast<std::int32_t>(Result::NotPermitted);
    Peer* slot = nullptr;
    std::uint32_t ref = 0;
    if (!refuse) {
      for (Peer& p : peers_)
        if (!p.used) {
          slot = &p;
          break;
        }
      if (!slot || peer_refs_.add(slot, ref) != Result::Ok) refuse = static_cast<std::int32_t>(Result::SessionTableFull);
    }
    if (!refuse) {
      Result r = loop_.add_watch(fd, Readable, [this, ref](int, short ev) { on_peer(ref, ev); }, slot->ch.watch);
      if (r != Result::Ok) {
        Result rr = peer_refs_.remove(ref);
        (void)rr;
        refuse = static_cast<std::int32_t>(r);
      }
    }
    if (refuse) {
      LEMSG_LOG(Warning, "service %s: refusing pid %ld uid %ld: %s", protocol_.id, static_cast<long>(c.pid),
                static_cast<long>(c.uid), to_string(static_cast<Result>(refuse)));
      Result r = detail::send_control(fd, wire::FrameType::Refuse, 0, wire::FlagError, &refuse, 4);
      (void)r;
      ::close(fd);
      continue;
    }
    slot->used = true;
    slot->open = false;
    slot->closing = false;
    slot->context = nullptr;
    slot->creds = c;
    slot->ch.fd = fd;
    slot->hello_deadline = detail::now_ns() + static_cast<std::int64_t>(LEMSG_OPEN_TIMEOUT_MS) * 1000000;
    reschedule();
  }
}

inline bool Service::on_hello(std::uint32_t ref, Peer& p) noexcept {
  unsigned char buf[wire::header_size + 8 + LEMSG_MAX_PROTOCOL_ID];
  std::size_t len = 0;
  int rfd = -1;
  Result r = detail::recv_datagram(p.ch.fd, buf, sizeof buf, len, rfd);
  if (r == Result::WouldBlock) return false;
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
    if (r != Result::Closed) LEMSG_LOG(Warning, "service %s: bad hello: %s", protocol_.id, to_string(r));
    (void)close_peer(ref, r == Result::TooLarge ? Result::BadFrame : r);
    return false;
  }
  std::int32_t refuse = 0;
  if (idlen != std::strlen(protocol_.id) || std::memcmp(buf + wire::header_size + 8, protocol_.id, idlen) != 0)
    refuse = static_cast<std::int32_t>(Result::ProtocolMismatch);
  else if (max != protocol_.max_payload)
    refuse = static_cast<std::int32_t>(Result::SizeMismatch);
  if (refuse) {
    LEMSG_LOG(Warning, "service %s: refusing pid %ld: %s", protocol_.id, static_cast<long>(p.creds.pid),
              to_string(static_cast<Result>(refuse)));
    r = detail::send_control(p.ch.fd, wire::FrameType::Refuse, 0, wire::FlagError, &refuse, 4);
    (void)close_peer(ref, static_cast<Result>(refuse));
    return false;
  }
  r = detail::send_control(p.ch.fd, wire::FrameType::Welcome, 0, 0, nullptr, 0);
  if (r != Result::Ok) {
    (void)close_peer(ref, r);
    return false;
  }
  p.open = true;
  reschedule();  // its hello deadline no longer counts
  if (open_handler_) {
    OpenHandler h = open_handler_;
    return life_.call([&] { h(SessionRef{ref}); });
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
    if (!p->open) {
      if (!on_hello(ref, *p)) return;
      continue;
    }
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
        LEMSG_LOG(Warning, "service %s: closing session of pid %ld: %s", protocol_.id,
                  static_cast<long>(p->creds.pid), to_string(r));
      (void)close_peer(ref, r);
      return;
    }
    detail::MsgBlock* b = m.blk_;
    b->session = ref;
    if (h.type == wire::FrameType::Request) {
      b->kind = detail::MsgKind::Request;
      b->service = this;
    } else {
      b->kind = detail::MsgKind::Received;
    }
    if (receive_handler_) {
      ReceiveHandler h = receive_handler_;  // a copy: the handler may replace itself
      // Releasing a request the handler left unanswered answers it, which
      // may close the session and run the close handler: inside the call.
      if (!life_.call([&] {
            h(m);
            m.release();
          }))
        return;
    } else {
      LEMSG_LOG(Debug, "service %s: no receive handler; frame released", protocol_.id);
      if (!life_.call([&] { m.release(); })) return;
    }
  }
}

inline void Service::answer_error(std::uint32_t session, std::uint32_t txn, Result code) noexcept {
  Peer* p = peer_refs_.lookup(session);
  if (!p || !p->open || p->closing) return;
  Message m;
  const std::int32_t c = static_cast<std::int32_t>(code);
  Result r = pool_.create(m);
  if (r == Result::Ok) {
    r = m.assign(&c, 4);
    if (r == Result::Ok) r = p->ch.send(loop_, m, wire::FrameType::Response, txn, wire::FlagError);
  } else if (p->ch.out_count == 0) {
    r = detail::send_control(p->ch.fd, wire::FrameType::Response, txn, wire::FlagError, &c, 4);
  } else {
    r = Result::Overflow;
  }
  if (r == Result::WouldBlock) r = Result::Overflow;
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
  return p->ch.send(loop_, m, wire::FrameType::Message, 0, 0);
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
  b->kind = detail::MsgKind::Outgoing;
  const Result r = p->ch.send(loop_, m, wire::FrameType::Response, b->txn, 0);
  if (r == Result::Ok) return r;
  // The response cannot reach the client. A dead peer's POLLHUP closes the
  // session from the loop; a peer that stopped reading is closed now,
  // because a response is never dropped silently.
  m.release();
  if (r == Result::Overflow) {
    (void)close_peer(ref, Result::Overflow);  // nothing of the Service is touched after it
    return r;
  }
  return Result::Closed;
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
  peer_refs_.for_each([&](Peer* p, std::uint32_t) {
    std::int64_t t = 0;
    if (!p->open) t = p->hello_deadline;
    else if (p->ch.starved) t = now + 5 * 1000000;
    if (t && (!next || t < next)) next = t;
  });
  Result r = next ? loop_.arm_timer(timer_, static_cast<std::uint32_t>(detail::ms_until(next)))
                  : loop_.disarm_timer(timer_);
  (void)r;
}

inline void Service::on_timer() noexcept {
  const std::int64_t now = detail::now_ns();
  std::uint32_t late[LEMSG_MAX_SESSIONS];
  std::size_t n = 0;
  peer_refs_.for_each([&](Peer* p, std::uint32_t ref) {
    if (!p->open && p->hello_deadline <= now) late[n++] = ref;
    if (p->ch.starved && pool_.available()) {
      p->ch.starved = false;
      p->ch.update_events(loop_);
    }
  });
  for (std::size_t i = 0; i < n; ++i) {
    LEMSG_LOG(Warning, "service %s: client sent no hello in time; closing", protocol_.id);
    if (!close_peer(late[i], Result::Timeout)) return;
  }
  reschedule();
}

// ---- Session ----

inline Session::Session(Loop& loop, const Protocol& protocol, MessagePoolBase& pool) noexcept
    : loop_(loop), protocol_(protocol), pool_(pool) {
  ++loop_.users_;
  ++pool_.users_;
  const std::size_t idlen = protocol.id ? std::strlen(protocol.id) : 0;
  if (idlen == 0 || idlen > LEMSG_MAX_PROTOCOL_ID || protocol.max_payload > pool.max_payload()) {
    status_ = Result::BadParameter;
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
  char dir[sizeof path_];
  std::memcpy(dir, path_, sizeof dir);
  dir[name_ - path_ - 1] = '\0';
  if (::inotify_add_watch(fd, dir, IN_CREATE | IN_MOVED_TO | IN_ATTRIB) < 0 ||
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
}

inline void Session::on_dir_event() noexcept {
  alignas(struct inotify_event) char buf[1024];
  bool ours = false, gone = false;
  for (;;) {
    const ssize_t n = ::read(dir_fd_, buf, sizeof buf);
    if (n <= 0) break;
    for (ssize_t off = 0; off + static_cast<ssize_t>(sizeof(struct inotify_event)) <= n;) {
      const struct inotify_event* ev = reinterpret_cast<const struct inotify_event*>(buf + off);
      if (ev->len && std::strcmp(ev->name, name_) == 0) ours = true;
      if (ev->mask & IN_IGNORED) gone = true;  // the directory itself went away
      off += static_cast<ssize_t>(sizeof(struct inotify_event) + ev->len);
    }
  }
  if (gone) stop_watching_dir();
  if ((ours || gone) && state_ == State::Waiting) attempt();
}

inline void Session::attempt() noexcept {
  int fd = -1;
  Result r = detail::connect_to(path_, fd);
  bool watching = false;
  if (r == Result::NotFound) {
    // Watch only once the server is missing (closing an inotify watch costs
    // milliseconds), then connect again, so a server that appeared in
    // between is not missed.
    const bool was_watching = dir_fd_ >= 0;
    watching = watch_dir();
    if (watching && !was_watching) r = detail::connect_to(path_, fd);
  }
  if (r == Result::Ok) {
    stop_watching_dir();
    const Result h = start_handshake(fd);
    if (h != Result::Ok) backoff();
    return;
  }
  if (r == Result::NotFound && watching) {
    state_ = State::Waiting;
    reschedule();
    return;
  }
  if (r == Result::NotPermitted) {
    fail_open(r);
    return;
  }
  // No inotify (the runtime dir is missing), a full backlog, or an error:
  // try again after a bounded backoff.
  backoff();
}

inline void Session::backoff() noexcept {
  stop_watching_dir();
  state_ = State::Backoff;
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
  ch_.blocking = detail::clear_nonblock(fd);
  state_ = State::Handshake;
  handshake_deadline_ = detail::now_ns() + static_cast<std::int64_t>(LEMSG_OPEN_TIMEOUT_MS) * 1000000;
  reschedule();
  return Result::Ok;
}

inline void Session::on_handshake_frame() noexcept {
  unsigned char buf[wire::header_size + 4];
  std::size_t len = 0;
  int rfd = -1;
  Result r = detail::recv_datagram(ch_.fd, buf, sizeof buf, len, rfd);
  if (r == Result::WouldBlock) return;
  if (rfd >= 0) {
    ::close(rfd);
    r = Result::BadFrame;
  }
  wire::Header h;
  if (r == Result::Ok) r = wire::decode(buf, len, 0, h);
  if (r == Result::Closed) {
    // The server went away between accept and answer (or it was a stale
    // listener); look for it again.
    ch_.reset(loop_);
    backoff();
    return;
  }
  if (r == Result::Ok && h.type == wire::FrameType::Welcome) {
    state_ = State::Open;
    backoff_next_ = backoff_min_;
    reschedule();
    if (open_cb_) {
      OpenCallback cb = open_cb_;
      // The last thing done here, so whether the Session survives is moot.
      (void)life_.call([&] { cb(Result::Ok); });
    }
    return;
  }
  Result why = Result::BadFrame;
  if (r == Result::Ok && h.type == wire::FrameType::Refuse) {
    std::int32_t code;
    std::memcpy(&code, buf + wire::header_size, 4);
    if (detail::known_result(code)) why = static_cast<Result>(code);
  }
  if (why == Result::SessionTableFull && reconnect_) {
    ch_.reset(loop_);
    backoff();
    return;
  }
  fail_open(why);
}

inline Result Session::handshake_blocking(int fd, std::int64_t deadline) noexcept {
  Result r = send_hello(fd);
  // Closed: the server may have refused us at accept; its answer is queued.
  if (r != Result::Ok && r != Result::Closed) return r;
  struct pollfd pfd = {fd, POLLIN, 0};
  for (;;) {
    const int rc = ::poll(&pfd, 1, detail::ms_until(deadline));
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) return Result::SystemError;
    if (rc == 0) return Result::Timeout;
    unsigned char buf[wire::header_size + 4];
    std::size_t len = 0;
    int rfd = -1;
    r = detail::recv_datagram(fd, buf, sizeof buf, len, rfd);
    if (r == Result::WouldBlock) continue;
    if (rfd >= 0) {
      ::close(rfd);
      return Result::BadFrame;
    }
    if (r != Result::Ok) return r;
    wire::Header h;
    r = wire::decode(buf, len, 0, h);
    if (r != Result::Ok) return r;
    if (h.type == wire::FrameType::Welcome) return Result::Ok;
    if (h.type != wire::FrameType::Refuse) return Result::BadFrame;
    std::int32_t code;
    std::memcpy(&code, buf + wire::header_size, 4);
    return detail::known_result(code) ? static_cast<Result>(code) : Result::BadFrame;
  }
}

inline Result Session::finish_open(int fd) noexcept {
  Result r = detail::peer_credentials(fd, server_);
  server_here_ = r == Result::Ok && server_.pid == ::getpid();
  if (r == Result::Ok) r = loop_.add_watch(fd, Readable, [this](int, short ev) { on_socket(ev); }, ch_.watch);
  if (r != Result::Ok) {
    ::close(fd);
    return r;
  }
  ch_.fd = fd;
  ch_.blocking = detail::clear_nonblock(fd);
  state_ = State::Open;
  backoff_next_ = backoff_min_;
  return Result::Ok;
}

inline Result Session::open_sync(const char* name, int timeout_ms) noexcept {
  if (timeout_ms <= 0) return Result::BadParameter;
  Result r = prepare(name);
  if (r != Result::Ok) return r;
  if (detail::served_by_this_thread(path_)) return Result::WouldDeadlock;
  const std::int64_t deadline = detail::now_ns() + static_cast<std::int64_t>(timeout_ms) * 1000000;
  int ino = -1;
  bool watched = false;
  for (;;) {
    int fd = -1;
    r = detail::connect_to(path_, fd);
    if (r == Result::Ok) {
      r = handshake_blocking(fd, deadline);
      if (r == Result::Ok) {
        r = finish_open(fd);
        break;
      }
      ::close(fd);
      if (r != Result::Closed) break;  // Closed: the server went away meanwhile; wait for it again
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
      ino = ::inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
      if (ino >= 0) {
        char dir[sizeof path_];
        std::memcpy(dir, path_, sizeof dir);
        dir[name_ - path_ - 1] = '\0';
        if (::inotify_add_watch(ino, dir, IN_CREATE | IN_MOVED_TO | IN_ATTRIB) < 0) {
          ::close(ino);
          ino = -1;
        }
      }
      continue;
    }
    // Wait for the socket to appear; without inotify, re-check every 20 ms.
    struct pollfd pfd = {ino, POLLIN, 0};
    const int wait = detail::ms_until(deadline);
    const int rc = ::poll(&pfd, ino >= 0 ? 1 : 0, (ino < 0 || r == Result::Busy) && wait > 20 ? 20 : wait);
    if (rc > 0) {
      alignas(struct inotify_event) char buf[1024];
      while (::read(ino, buf, sizeof buf) > 0) {
      }
    }
  }
  if (ino >= 0) ::close(ino);
  return r;
}

inline Result Session::try_open(const char* name) noexcept {
  Result r = prepare(name);
  if (r != Result::Ok) return r;
  if (detail::served_by_this_thread(path_)) return Result::WouldDeadlock;
  int fd = -1;
  r = detail::connect_to(path_, fd);
  if (r != Result::Ok) return r;
  r = handshake_blocking(fd, detail::now_ns() + static_cast<std::int64_t>(LEMSG_OPEN_TIMEOUT_MS) * 1000000);
  if (r != Result::Ok) {
    ::close(fd);
    return r == Result::Closed ? Result::NotFound : r;
  }
  return finish_open(fd);
}

inline bool Session::complete_all(Result why) noexcept {
  std::uint32_t refs[LEMSG_MAX_PENDING];
  std::size_t n = 0;
  pending_refs_.for_each([&](Pending*, std::uint32_t ref) { refs[n++] = ref; });
  for (std::size_t i = 0; i < n; ++i) {
    // A handler may have completed the rest already (close(), or the
    // destructor, run inside it).
    Pending* p = pending_refs_.lookup(refs[i]);
    if (!p) continue;
    ResponseHandler done = std::move(p->done);
    p->used = false;
    Result r = pending_refs_.remove(refs[i]);
    (void)r;
    Message none;
    if (done && !life_.call([&] { done(why, none); })) return false;
  }
  return true;
}

inline void Session::close() noexcept {
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

inline void Session::on_socket(short revents) noexcept {
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
    if (r == Result::Ok && h.type != wire::FrameType::Message && h.type != wire::FrameType::Response)
      r = Result::BadFrame;
    // An error response must carry a known error: one claiming Ok (0) is as
    // malformed as an unknown code, or the request would "succeed" empty.
    if (r == Result::Ok && (h.flags & wire::FlagError) && !detail::known_result(m.blk_->status)) r = Result::BadFrame;
    if (r != Result::Ok) {
      if (r != Result::Closed) LEMSG_LOG(Warning, "session %s: server sent a bad frame: %s", name_, to_string(r));
      (void)lose_server(r);
      return;
    }
    m.blk_->kind = h.type == wire::FrameType::Response ? detail::MsgKind::Response : detail::MsgKind::Received;
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
  Pending* p = pending_refs_.lookup(txn);
  if (!p) {
    // Its request timed out or was closed: a late answer, discarded.
    LEMSG_LOG(Debug, "session %s: response to no pending request; discarded", name_);
    return true;
  }
  ResponseHandler done = std::move(p->done);
  const bool had_deadline = p->deadline != 0;
  p->used = false;
  Result r = pending_refs_.remove(txn);
  (void)r;
  if (had_deadline) reschedule();
  const Result status = m.status();
  if (status != Result::Ok) {
    Message none;
    return life_.call([&] { done(status, none); });
  }
  return life_.call([&] { done(Result::Ok, m); });
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
  Pending* slot = nullptr;
  for (Pending& p : pending_)
    if (!p.used) {
      slot = &p;
      break;
    }
  std::uint32_t txn = 0;
  if (!slot || pending_refs_.add(slot, txn) != Result::Ok) return Result::PendingTableFull;
  r = ch_.send(loop_, m, wire::FrameType::Request, txn, 0);
  if (r != Result::Ok) {
    Result rr = pending_refs_.remove(txn);
    (void)rr;
    return r;
  }
  slot->used = true;
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
  Pending* slot = nullptr;
  for (Pending& p : pending_)
    if (!p.used) {
      slot = &p;
      break;
    }
  std::uint32_t txn = 0;
  if (!slot || pending_refs_.add(slot, txn) != Result::Ok) return Result::PendingTableFull;
  slot->used = true;
  slot->deadline = 0;  // this call enforces its own timeout
  auto finish = [&](Result res) {
    slot->used = false;
    Result rr = pending_refs_.remove(txn);
    (void)rr;
    if (deferred_count_ || lost_pending_) {
      Result ra = loop_.arm_timer(timer_, 0);
      (void)ra;
    }
    return res;
  };
  r = ch_.send(loop_, m, wire::FrameType::Request, txn, 0);
  if (r != Result::Ok) {
    slot->used = false;
    Result rr = pending_refs_.remove(txn);
    (void)rr;
    return r;
  }
  const std::int64_t deadline = detail::now_ns() + static_cast<std::int64_t>(timeout_ms) * 1000000;
  for (;;) {
    const int left = detail::ms_until(deadline);
    if (left == 0) return finish(Result::Timeout);
    // Nothing left to send: wait inside recvmsg, one system call per answer
    // like a plain blocking client. Otherwise poll, to send and receive.
    const bool wait = ch_.out_count == 0 && ch_.set_wait(left);
    if (!wait) {
      struct pollfd pfd = {ch_.fd, static_cast<short>(POLLIN | (ch_.out_count ? POLLOUT : 0)), 0};
      const int rc = ::poll(&pfd, 1, left);
      if (rc < 0 && errno == EINTR) continue;
      if (rc < 0) return finish(Result::SystemError);
      if (rc == 0) return finish(Result::Timeout);
      if ((pfd.revents & POLLOUT) && ch_.flush(loop_) != Result::Ok) pfd.revents |= POLLHUP;
      if (!(pfd.revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL))) continue;
    }
    Message in;
    wire::Header h;
    r = ch_.receive(pool_, protocol_.max_payload, in, h, wait);
    if (r == Result::WouldBlock) continue;  // no answer yet: the deadline decides
    if (r == Result::PoolEmpty) return finish(Result::PoolEmpty);
    if (r == Result::Ok && h.type != wire::FrameType::Message && h.type != wire::FrameType::Response)
      r = Result::BadFrame;
    if (r == Result::Ok && (h.flags & wire::FlagError) && !detail::known_result(in.blk_->status)) r = Result::BadFrame;
    if (r != Result::Ok) {
      // Finish the loss on the loop, after this call returns: the close
      // handler and other completions must not run inside request_sync.
      ch_.reset(loop_);
      state_ = State::Idle;
      lost_pending_ = true;
      lost_reason_ = r;
      return finish(Result::Closed);
    }
    in.blk_->kind = h.type == wire::FrameType::Response ? detail::MsgKind::Response : detail::MsgKind::Received;
    if (h.type == wire::FrameType::Response && h.txn == txn) {
      const Result status = in.status();
      if (status == Result::Ok) response = std::move(in);
      return finish(status);
    }
    if (deferred_count_ == LEMSG_MAX_DEFERRED) {
      LEMSG_LOG(Warning, "session %s: more than LEMSG_MAX_DEFERRED frames during request_sync; closing", name_);
      ch_.reset(loop_);
      state_ = State::Idle;
      lost_pending_ = true;
      lost_reason_ = Result::Overflow;
      return finish(Result::Overflow);
    }
    deferred_[(deferred_head_ + deferred_count_) % LEMSG_MAX_DEFERRED] = std::move(in);
    ++deferred_count_;
  }
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
    Pending* p = pending_refs_.lookup(late[i]);
    if (!p) continue;
    ResponseHandler done = std::move(p->done);
    p->used = false;
    Result r = pending_refs_.remove(late[i]);
    (void)r;
    Message none;
    if (done && !life_.call([&] { done(Result::Timeout, none); })) return;
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
