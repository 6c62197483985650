// files_api.hpp: the interface of examples/fdpass, shared by server.cpp and
// client.cpp: a service that hands out files as open file descriptors (a
// `file` parameter in a Legato .api). See server.cpp for how to run it.
#pragma once

#include "lemsg.hpp"

struct FileName {
  lemsg::String<32> name;
};
// An Fd field travels as the message's one descriptor (SCM_RIGHTS): the
// receiver gets its own descriptor of the same open file. At most one per
// message, which the compiler checks.
struct OpenedFile {
  lemsg::Fd file;
  std::uint32_t size;  // bytes in the file
};

LEMSG_METHOD(OpenFile, FileName, OpenedFile);  // a name the server does not serve: NotFound

struct FilesApi : lemsg::Interface<OpenFile> {
  static constexpr const char* name = "acme.files";
};

// The name the server advertises and the client opens.
constexpr const char* kFilesService = "files";
