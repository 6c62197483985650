// tests/consumer/main.cpp: a program of a project that uses lemsg the way
// its users do, through CMake (add_subdirectory or find_package) or
// pkg-config, built by tests/consumer.sh. A service runs on a second thread
// (so the package's thread flags must link), the main thread opens a session
// to it and asks it to reverse a word. Prints the lemsg version and what it
// got; exits 0 only when everything worked.
//
// It is a C++20 program: the package asks for C++17 as a minimum and must
// not lower the language level (a -std=c++17 in lemsg.pc or in the CMake
// target would trip the static_assert below).

#include <lemsg.hpp>

#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <string_view>
#include <thread>

static_assert(__cplusplus >= 202002L, "built as C++20, yet the language level is lower: does lemsg add a -std flag?");

namespace consumer_test {

constexpr lemsg::Protocol kReverse{"lemsg.consumer.reverse.v1", 64};
constexpr const char* kName = "consumer-reverse";

// The server thread: advertises, answers requests until the client closes,
// and gives up after 10 s (a timer) whatever happens. Writes 1 to `ready`
// once advertised (or -1 if it could not), and its exit code to `rc`.
void serve(lemsg::Loop& loop, std::atomic<int>& ready, int& rc) {
  lemsg::MessagePool<64, 4> pool;
  lemsg::Service svc(loop, kReverse, pool);
  svc.set_receive_handler([&](lemsg::Message& m) {
    if (!m.needs_response()) return;
    char* p = static_cast<char*>(m.payload());
    for (std::uint32_t i = 0, j = m.size(); i + 1 < j; ++i, --j) {
      const char c = p[i];
      p[i] = p[j - 1];
      p[j - 1] = c;
    }
    if (svc.respond(std::move(m)) != lemsg::Result::Ok) rc = 1;
  });
  svc.set_close_handler([&](lemsg::SessionRef, lemsg::Result) { loop.stop(); });
  lemsg::TimerId give_up;
  if (loop.add_timer([&] { rc = 1; loop.stop(); }, give_up) != lemsg::Result::Ok ||
      loop.arm_timer(give_up, 10000) != lemsg::Result::Ok) {
    rc = 1;
    ready = -1;
    return;
  }
  const lemsg::Result r = svc.advertise(kName);
  if (r != lemsg::Result::Ok) {
    std::printf("consumer: advertise: %s\n", lemsg::to_string(r));
    rc = 1;
    ready = -1;
    return;
  }
  ready = 1;
  if (loop.run() != lemsg::Result::Ok) rc = 1;
}

// The client, on the calling thread with a loop of its own. 0 on success.
int ask() {
  lemsg::Loop loop;
  lemsg::MessagePool<64, 4> pool;
  lemsg::Session session(loop, kReverse, pool);
  lemsg::Result r = session.open_sync(kName, 5000);
  if (r != lemsg::Result::Ok) {
    std::printf("consumer: open: %s\n", lemsg::to_string(r));
    return 1;
  }
  lemsg::Message request, response;
  if (session.create_message(request) != lemsg::Result::Ok) return 1;
  if (request.assign("lemsg", 5) != lemsg::Result::Ok) return 1;
  r = session.request_sync(std::move(request), response, 5000);
  if (r != lemsg::Result::Ok) {
    std::printf("consumer: request: %s\n", lemsg::to_string(r));
    return 1;
  }
  const std::string_view got(static_cast<const char*>(response.payload()), response.size());
  std::printf("consumer: asked 'lemsg', got '%.*s'\n", static_cast<int>(got.size()), got.data());
  session.close();
  return got == "gsmel" ? 0 : 1;
}

}  // namespace consumer_test

int main() {
  // Whatever hangs, the process ends within 30 s (a failure).
  alarm(30);
  std::printf("consumer: lemsg %s, C++ %ld\n", LEMSG_VERSION_STR, static_cast<long>(__cplusplus));
#ifdef LEMSG_CONSUMER_EXPECT_VERSION
  // The version the package says it is (CMake's lemsg_VERSION, or
  // pkg-config --modversion) must be the header's.
  if (std::strcmp(LEMSG_CONSUMER_EXPECT_VERSION, LEMSG_VERSION_STR) != 0) {
    std::printf("consumer: the package says version %s, the header %s\n", LEMSG_CONSUMER_EXPECT_VERSION,
                LEMSG_VERSION_STR);
    return 1;
  }
#endif

  // A runtime dir of our own: /run/lemsg needs root.
  char dir[] = "/tmp/lemsg-consumer-XXXXXX";
  if (mkdtemp(dir) == nullptr || setenv("LEMSG_RUNTIME_DIR", dir, 1) != 0) {
    std::printf("consumer: no runtime dir\n");
    return 1;
  }

  int rc = 0;
  {
    lemsg::Loop server_loop;
    std::atomic<int> ready{0};
    int server_rc = 0;
    std::thread server(consumer_test::serve, std::ref(server_loop), std::ref(ready), std::ref(server_rc));
    // open_sync waits for the advertise itself (inotify), so no need to
    // wait for `ready` first; it only says why a failure happened.
    rc = consumer_test::ask();
    if (rc != 0 && ready.load() != 1) std::printf("consumer: the service never advertised\n");
    server_loop.stop();  // any thread; in case the close did not reach it
    server.join();
    if (server_rc != 0) {
      std::printf("consumer: the service failed\n");
      rc = 1;
    }
  }
  rmdir(dir);
  std::printf("consumer: %s\n", rc == 0 ? "ok" : "FAILED");
  return rc;
}
