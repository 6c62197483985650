// lemsg.hpp on its own: this file includes nothing else and is compiled (not
// linked) with every warning an error, plus -Wshadow, -Wconversion,
// -Wsign-conversion and -Wold-style-cast, as strict firmware builds use, to
// show the header is self-contained and clean. The typed layer's templates
// are instantiated here, since nothing is checked of a template not used.
#include "lemsg.hpp"

int lemsg_alone_check();

namespace alone {
enum class Mode : std::uint16_t { Off = 0, On = 1, Auto = 2 };
struct Obj;
struct Inner {
  lemsg::Optional<double> d;
  lemsg::Array<lemsg::String<3>, 2> names;
};
struct Req {
  bool b;
  std::int8_t i8;
  std::uint64_t u64;
  float f;
  Mode mode;
  lemsg::Flags<Mode> flags;
  lemsg::String<300> text;
  lemsg::Bytes<70000> blob;
  Inner inner;
  lemsg::Ref<Obj> ref;
};
struct Resp {
  lemsg::Fd fd;
  std::int32_t code;
};
LEMSG_METHOD(Do, Req, Resp);
LEMSG_ONEWAY(Tell, Inner);
LEMSG_EVENT(Changed, Inner);
struct Api : lemsg::Interface<Do, Tell, Changed> {
  static constexpr const char* name = "alone";
};
struct Obj {
  int x;
};

void instantiate(lemsg::Loop& loop, lemsg::MessagePoolBase& pool) {
  lemsg::TypedService<Api> svc(loop, pool);
  lemsg::RefMap<Obj, 4> map;
  (void)svc.bind_refs<Obj>(map, nullptr);
  svc.set_handler<Do>([](lemsg::Responder<Do>& r, Req&) { (void)r.reply(Resp{}); });
  svc.set_handler<Tell>([](const lemsg::Caller&, Inner&) {});
  (void)svc.emit<Changed>(Inner{});
  lemsg::TypedClient<Api> c(loop, pool);
  Req req{};
  Resp resp;
  (void)c.call<Do>(req, resp, 10);
  (void)c.call_async<Do>(req, [](lemsg::Result, Resp&) {});
  (void)c.send<Tell>(Inner{});
  (void)c.subscribe<Changed>([](Inner&) {});
  (void)c.unsubscribe<Changed>();
}
}  // namespace alone

int lemsg_alone_check() {
  static_assert(lemsg::InterfaceInfo<alone::Api>::max_payload > 70000, "the largest frame is Do's request");
  return LEMSG_VERSION_MAJOR * 10000 + LEMSG_VERSION_MINOR * 100 + LEMSG_VERSION_PATCH;
}
