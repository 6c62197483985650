// client.cpp: a client that survives restarts of its server (examples/reconnect).
//
// In Legato a client whose server goes away dies by default (no session
// close handler: LE_FATAL) and the Supervisor restarts it. A lemsg client
// can stay up and keep its session instead:
//   - set_reconnect(true, min_ms, max_ms): when the server's end goes away,
//     the session opens again by itself, first after min_ms, doubling up to
//     max_ms while attempts fail, then waiting (inotify, no polling) for the
//     socket file to come back;
//   - the close handler says the server went (calls still waiting have
//     completed with Closed by then);
//   - the open callback runs after every open, the first and each reopen:
//     the place to redo what a new server must be told or asked. Here it
//     reads the current level, since the levels sent while no server ran
//     are lost;
//   - the subscription to LevelChanged is made once: a TypedClient keeps its
//     subscriptions and sends them again each time the session opens, before
//     the open callback runs (with a raw Session, send your own subscribe
//     message from the open callback).
// It starts before any server (open() waits for one) and exits 0 once levels
// came from `servers` server processes (2 from main(): one restart), with
// one reopen per restart, each followed by a fresh GetLevel; 1 if that did
// not happen within 60 s.
//
//   make examples     builds both into build/<target>/examples/reconnect/
// By hand, in a private runtime directory (instead of /run/lemsg):
//   export LEMSG_RUNTIME_DIR=$(mktemp -d)
//   build/host/examples/reconnect/client &
//   build/host/examples/reconnect/server & sleep 1; kill -9 $!
//   build/host/examples/reconnect/server
#include "gauge_api.hpp"

#include <cstdio>

// What the client saw, and when it has seen enough.
struct Seen {
  lemsg::Loop& loop;
  int want;         // servers to see
  int opens = 0;    // the first open and each reopen
  int losses = 0;   // the server went away
  int resyncs = 0;  // GetLevel answered after an open
  int servers = 0;  // server processes that sent this client events
  std::int32_t event_pid = 0;

  void show(const char* how, const Level& l) {
    std::printf("client: %s %u%% (server %d, level #%u)\n", how, l.percent, static_cast<int>(l.server_pid), l.seq);
    if (servers == want && resyncs == want) loop.stop();
  }
};

int run_client(int servers) {
  lemsg::Loop loop;
  lemsg::TypedPool<GaugeApi, 4> pool;
  lemsg::TypedClient<GaugeApi> gauge(loop, pool);
  Seen seen{loop, servers};

  gauge.session().set_reconnect(true, 50, 500);
  gauge.session().set_close_handler([&seen](lemsg::Result why) {
    ++seen.losses;
    std::printf("client: lost the server (%s); reopening by itself\n", lemsg::to_string(why));
  });
  // Once; sent again by the TypedClient after every reopen.
  const lemsg::Result subscribed = gauge.subscribe<LevelChanged>([&seen](Level& l) {
    if (l.server_pid != seen.event_pid) ++seen.servers;  // the first event of a new server
    seen.event_pid = l.server_pid;
    seen.show("event", l);
  });
  const lemsg::Result opening = gauge.open(kGaugeService, [&seen, &gauge](lemsg::Result r) {
    if (r != lemsg::Result::Ok) {  // a mismatched server, say: the attempt ends
      std::printf("client: open failed: %s\n", lemsg::to_string(r));
      seen.loop.stop();
      return;
    }
    ++seen.opens;
    std::printf("client: session open (%s)\n", seen.opens == 1 ? "first time" : "again");
    auto resynced = [&seen](lemsg::Result got, Level& l) {
      if (got != lemsg::Result::Ok) return;  // the server went again meanwhile
      ++seen.resyncs;
      seen.show("now", l);
    };
    const lemsg::Result asked = gauge.call_async<GetLevel>({}, resynced, 2000);
    if (asked != lemsg::Result::Ok) std::printf("client: GetLevel: %s\n", lemsg::to_string(asked));
  });

  lemsg::TimerId give_up;
  if (subscribed != lemsg::Result::Ok || opening != lemsg::Result::Ok ||
      loop.add_timer([&loop] { loop.stop(); }, give_up) != lemsg::Result::Ok ||
      loop.arm_timer(give_up, 60000) != lemsg::Result::Ok || loop.run() != lemsg::Result::Ok)
    return 1;
  std::printf("client: %d opens, %d servers lost, levels from %d servers\n", seen.opens, seen.losses, seen.servers);
  const bool expected = seen.opens == servers && seen.losses == servers - 1 && seen.servers == servers &&
                        seen.resyncs == servers;
  return expected ? 0 : 1;
}

int main() { return run_client(2); }
