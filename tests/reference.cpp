// The API reference (docs/API.md) against the header: every public name of
// lemsg.hpp must have an entry there, so a new function cannot ship
// undocumented. The test reads both files at run time (LEMSG_TEST_SOURCE_DIR,
// an absolute path; qemu-user sees the host's files) and extracts the public
// API from the header by itself, with a small tokenizer that knows the
// header's own shape, not all of C++.
//
// Public names (each with the header section it is declared in, from the
// banners "// N. Title ... >>tag"):
//   - types, free functions and namespace-scope constants of namespace lemsg
//     and lemsg::wire (never lemsg::detail);
//   - of each public class or struct: its public member functions (operators
//     as `operator bool`, `operator==`...), data members, static constants,
//     member aliases and nested types; not constructors, destructors,
//     operator=, nor anything `= delete` or `= default`; nothing under
//     private: or protected:. Out-of-line definitions (`Loop::run(...) {`,
//     after a section's `// -- implementation --` rule) declare nothing new
//     and are skipped; a type or function first declared below that rule
//     (InterfaceInfo, Directory) still counts;
//   - the enumerators of public enums, and Result's from its X-macro list;
//   - user macros: each `#ifndef LEMSG_X` / `#define LEMSG_X` default, and
//     every other `#define LEMSG_*` but the include guard and LEMSG_DETAIL_*;
//   - environment variables the header reads (getenv("LEMSG_...")).
//
// An entry in docs/API.md:
//   - The file is cut into sections by its `## ` headings; a section
//     belongs to the header section whose grep tag its heading carries as a
//     code span: "## 10. Service (`>>service`)".
//   - Entry spans are the code spans of a heading, the code spans of a
//     table row's first cell, and the code spans that open a list item
//     ("- `a`, `b` — text": `a` and `b`). Spans in prose, in other cells and
//     in fenced blocks are not entries.
//   - A heading's subject is its first code span that is not a tag, without
//     "namespace", "class", "struct", "enum", "lemsg::", and template or
//     call arguments: "### `RefMap<T, N>`" is about RefMap.
//   - A name's entry is an entry span in its header section's part of the
//     file that holds the name as a whole word; a function's name must be
//     followed by `(` or `<` (`advertise(`, `set_handler<M>(`). A member of
//     class C (C::m) also needs a heading about C above the span (C, or its
//     last component: `FrameType` for wire::FrameType), unless the span
//     holds the qualified name itself (`Service::advertise`, `Kind::Service`).
//   - Environment variables may have their entry anywhere.
//
// LEMSG_API_DOC=<path> checks another copy of the reference (to see this
// test fail); LEMSG_REFERENCE_DUMP=1 prints every name the extractor found.
#define DOCTEST_CONFIG_NO_EXCEPTIONS_BUT_WITH_ALL_ASSERTS
#include <doctest/doctest.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#ifndef LEMSG_TEST_SOURCE_DIR
#error "LEMSG_TEST_SOURCE_DIR must name the source tree (the Makefile defines it)"
#endif

namespace reference_test {

// One public name of the header.
struct Name {
  std::string scope;    // "" (namespace lemsg), "wire", "Service", "wire::Header"...
  std::string name;     // "advertise", "operator bool", "LEMSG_MAX_SESSIONS"
  std::string kind;     // function, type, member, enumerator, constant, macro, env
  std::string section;  // the header section's grep tag: "service"
  int line = 0;         // in lemsg.hpp
  std::string qualified() const { return scope.empty() ? name : scope + "::" + name; }
};

bool read_file(const std::string& path, std::string& out) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return false;
  out.clear();
  char buf[65536];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
  const bool ok = !std::ferror(f);
  std::fclose(f);
  return ok;
}

std::vector<std::string> split_lines(const std::string& text) {
  std::vector<std::string> lines;
  std::size_t start = 0;
  for (;;) {
    const std::size_t nl = text.find('\n', start);
    if (nl == std::string::npos) {
      if (start < text.size()) lines.push_back(text.substr(start));
      return lines;
    }
    lines.push_back(text.substr(start, nl - start));
    start = nl + 1;
  }
}

bool is_ident_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}
bool is_ident_start(char c) { return is_ident_char(c) && !(c >= '0' && c <= '9'); }

std::string trim(const std::string& s) {
  std::size_t b = 0, e = s.size();
  while (b < e && (s[b] == ' ' || s[b] == '\t' || s[b] == '\r')) ++b;
  while (e > b && (s[e - 1] == ' ' || s[e - 1] == '\t' || s[e - 1] == '\r')) --e;
  return s.substr(b, e - b);
}

bool starts_with(const std::string& s, const char* prefix) { return s.compare(0, std::strlen(prefix), prefix) == 0; }

// ---- the header

// The section tag of each line (0-based): from the banners "// N. Title >>tag"
// that follow a "// ====" rule. Lines above the first banner (the manual and
// the version macros) count as config.
std::vector<std::string> section_of_lines(const std::vector<std::string>& lines) {
  std::vector<std::string> tags(lines.size());
  std::string tag = "config";
  for (std::size_t i = 0; i < lines.size(); ++i) {
    const std::string& l = lines[i];
    if (i > 0 && starts_with(lines[i - 1], "// ====") && l.size() > 4 && starts_with(l, "// ") && l[3] >= '0' &&
        l[3] <= '9') {
      const std::size_t at = l.find(">>");
      if (at != std::string::npos) tag = trim(l.substr(at + 2));
    }
    tags[i] = tag;
  }
  return tags;
}

// The code with comments, the contents of string and character literals and
// preprocessor lines blanked out (newlines kept, so lines still count).
std::string blank_non_code(const std::string& src) {
  std::string out = src;
  std::size_t i = 0;
  bool line_start = true;
  while (i < out.size()) {
    const char c = out[i];
    if (c == '\n') {
      line_start = true;
      ++i;
      continue;
    }
    if (line_start && (c == ' ' || c == '\t')) {
      ++i;
      continue;
    }
    if (line_start && c == '#') {
      // A directive, with its continuation lines.
      for (;;) {
        while (i < out.size() && out[i] != '\n') out[i++] = ' ';
        if (i >= 2 && src[i - 1] == '\\' && i < out.size()) {
          ++i;
          continue;
        }
        break;
      }
      continue;
    }
    line_start = false;
    if (c == '/' && i + 1 < out.size() && out[i + 1] == '/') {
      while (i < out.size() && out[i] != '\n') out[i++] = ' ';
      continue;
    }
    if (c == '/' && i + 1 < out.size() && out[i + 1] == '*') {
      out[i++] = ' ';
      out[i++] = ' ';
      while (i < out.size() && !(out[i] == '*' && i + 1 < out.size() && out[i + 1] == '/')) {
        if (out[i] != '\n') out[i] = ' ';
        ++i;
      }
      if (i < out.size()) out[i++] = ' ';
      if (i < out.size()) out[i++] = ' ';
      continue;
    }
    if (c == '"' || c == '\'') {
      ++i;
      while (i < out.size() && out[i] != c && out[i] != '\n') {
        if (out[i] == '\\' && i + 1 < out.size()) out[i++] = ' ';
        out[i++] = ' ';
      }
      if (i < out.size() && out[i] == c) ++i;
      continue;
    }
    ++i;
  }
  return out;
}

struct Token {
  std::string text;
  int line;  // 0-based
};

std::vector<Token> tokenize(const std::string& code) {
  static const char* const multi[] = {"::", "->", "...", "&&", "||", "==", "!=", "<=", ">="};
  std::vector<Token> toks;
  int line = 0;
  std::size_t i = 0;
  while (i < code.size()) {
    const char c = code[i];
    if (c == '\n') {
      ++line;
      ++i;
    } else if (c == ' ' || c == '\t' || c == '\r' || c == '\f' || c == '\v') {
      ++i;
    } else if (is_ident_char(c)) {
      // Identifiers and numbers alike (a number never names anything).
      std::size_t j = i;
      while (j < code.size() && (is_ident_char(code[j]) || (!is_ident_start(code[i]) && code[j] == '.'))) ++j;
      toks.push_back({code.substr(i, j - i), line});
      i = j;
    } else if (c == '"' || c == '\'') {
      // A blanked literal: one token up to the closing quote.
      std::size_t j = i + 1;
      while (j < code.size() && code[j] != c && code[j] != '\n') ++j;
      if (j < code.size() && code[j] == c) ++j;
      toks.push_back({"\"\"", line});
      i = j;
    } else {
      std::size_t len = 1;
      for (const char* m : multi)
        if (code.compare(i, std::strlen(m), m) == 0) {
          len = std::strlen(m);
          break;
        }
      toks.push_back({code.substr(i, len), line});
      i += len;
    }
  }
  return toks;
}

bool is_ident(const std::string& t) { return !t.empty() && is_ident_start(t[0]); }

bool is_class_key(const std::string& t) { return t == "class" || t == "struct" || t == "union" || t == "enum"; }

class Extractor {
 public:
  Extractor(const std::vector<Token>& toks, const std::vector<std::string>& sections)
      : toks_(toks), sections_(sections) {}

  void run() {
    std::size_t i = 0;
    Scope top;
    block(i, top);
  }

  std::vector<Name> names;

 private:
  struct Scope {
    std::string path;        // "", "wire", "Service"...
    std::string class_name;  // the class's own name, for constructors
    bool hidden = false;     // detail, or a non-public part
    bool in_class = false;
    bool is_public = true;   // the current access of a class body
  };

  static std::string join(const std::string& path, const std::string& name) {
    return path.empty() ? name : path + "::" + name;
  }

  // A name seen again keeps its first place, except that a type's
  // definition wins over a forward declaration ("class Service;" in the
  // message section does not make Service a message type).
  void add(const std::string& scope, const std::string& name, const char* kind, int line, bool forward = false) {
    if (name.empty() || starts_with(name, "LEMSG_")) return;
    const std::string section =
        line >= 0 && static_cast<std::size_t>(line) < sections_.size() ? sections_[line] : "";
    for (std::size_t k = 0; k < names.size(); ++k) {
      Name& n = names[k];
      if (n.scope != scope || n.name != name) continue;
      if (forward_[k] && !forward) {
        n.section = section;
        n.line = line + 1;
        forward_[k] = false;
      }
      return;
    }
    Name n;
    n.scope = scope;
    n.name = name;
    n.kind = kind;
    n.line = line + 1;
    n.section = section;
    names.push_back(n);
    forward_.push_back(forward);
  }

  // Skips a balanced { ... } from toks_[i] == "{"; i ends past the "}".
  void skip_braces(std::size_t& i) const {
    int depth = 0;
    for (; i < toks_.size(); ++i) {
      if (toks_[i].text == "{") ++depth;
      if (toks_[i].text == "}" && --depth == 0) {
        ++i;
        return;
      }
    }
  }

  // The declaration without its template<...> prefixes and [[attributes]].
  static std::vector<Token> strip_prefix(const std::vector<Token>& decl) {
    std::size_t k = 0;
    for (;;) {
      if (k + 1 < decl.size() && decl[k].text == "template" && decl[k + 1].text == "<") {
        int angle = 0, paren = 0;
        for (; k < decl.size(); ++k) {
          const std::string& t = decl[k].text;
          if (t == "(") ++paren;
          if (t == ")") --paren;
          if (paren == 0 && t == "<") ++angle;
          if (paren == 0 && t == ">" && --angle == 0) {
            ++k;
            break;
          }
        }
        continue;
      }
      if (k + 1 < decl.size() && decl[k].text == "[" && decl[k + 1].text == "[") {
        while (k < decl.size() && !(decl[k].text == "]" && k + 1 < decl.size() && decl[k + 1].text == "]")) ++k;
        k += 2;
        continue;
      }
      break;
    }
    return std::vector<Token>(decl.begin() + static_cast<std::ptrdiff_t>(k < decl.size() ? k : decl.size()),
                              decl.end());
  }

  // A class-key head: "class|struct|union|enum [class|struct] [[attr]] Name ..."
  // Sets `name` ("" for an anonymous enum) and `body_next`: whether what
  // follows the name is a definition's head (":", "{", "<", "final").
  static bool class_head(const std::vector<Token>& d, std::string& key, std::string& name, bool& fwd) {
    if (d.empty() || !is_class_key(d[0].text)) return false;
    key = d[0].text;
    std::size_t k = 1;
    if (key == "enum" && k < d.size() && (d[k].text == "class" || d[k].text == "struct")) ++k;
    while (k + 1 < d.size() && d[k].text == "[" && d[k + 1].text == "[") {
      while (k < d.size() && !(d[k].text == "]" && k + 1 < d.size() && d[k + 1].text == "]")) ++k;
      k += 2;
    }
    name.clear();
    if (k < d.size() && is_ident(d[k].text) && d[k].text != "final") name = d[k++].text;
    if (k >= d.size()) {
      fwd = !name.empty();
      return true;  // "class X" before ";" or "{"
    }
    const std::string& next = d[k].text;
    fwd = false;
    // Anything else ("struct pollfd* fds", "struct stat st") is an elaborated
    // type in an ordinary declaration.
    return next == ":" || next == "<" || next == "final";
  }

  // Records the enumerators of the enum body at toks_[i] == "{" under `scope`.
  void enumerators(std::size_t i, const std::string& scope) {
    int depth = 0;
    bool expect = true;
    for (; i < toks_.size(); ++i) {
      const std::string& t = toks_[i].text;
      if (t == "{" || t == "(") ++depth;
      if (t == "}" || t == ")") {
        if (--depth == 0) return;
      }
      if (depth == 1 && t == ",") {
        expect = true;
        continue;
      }
      if (depth == 1 && expect && is_ident(t)) {
        add(scope, t, "enumerator", toks_[i].line);
        expect = false;
      }
    }
  }

  // An ordinary declaration (a function, variable, member or alias) in `s`.
  void declaration(const std::vector<Token>& decl, const Scope& s, bool has_body) {
    std::vector<Token> d = strip_prefix(decl);
    if (d.empty()) return;
    const std::string& first = d[0].text;
    if (first == "static_assert" || first == "namespace" || first == "typedef") return;
    if (first == "using") {
      if (d.size() > 2 && d[1].text != "namespace" && is_ident(d[1].text) && d[2].text == "=")
        add(s.path, d[1].text, s.in_class ? "member" : "type", d[1].line);
      return;
    }
    bool is_friend = false;
    std::size_t k = 0;
    static const char* const specifiers[] = {"inline", "static", "constexpr", "explicit", "virtual",
                                              "extern", "friend", "mutable",  "typename"};
    for (bool again = true; again && k < d.size();) {
      again = false;
      for (const char* sp : specifiers)
        if (d[k].text == sp) {
          is_friend = is_friend || d[k].text == "friend";
          ++k;
          again = true;
          break;
        }
    }
    if (k >= d.size()) return;
    if (is_friend && is_class_key(d[k].text)) return;  // friend class X;
    // Defaulted and deleted functions are the type's business, not entries.
    if (d.size() >= 2 && d[d.size() - 2].text == "=" &&
        (d.back().text == "delete" || d.back().text == "default"))
      return;
    int angle = 0;
    for (std::size_t j = k; j < d.size(); ++j) {
      const std::string& t = d[j].text;
      if (t == "<") ++angle;
      if (t == ">" && angle > 0) --angle;
      if (angle > 0) continue;
      if (t == "operator") {
        std::string op;
        std::size_t m = j + 1;
        if (m + 1 < d.size() && d[m].text == "(" && d[m + 1].text == ")") {
          op = "()";
        } else {
          for (; m < d.size() && d[m].text != "("; ++m) op += (op.empty() || !is_ident(d[m].text) ? "" : " ") + d[m].text;
        }
        // Qualified (an out-of-line definition), or assignment: not an entry.
        if ((j > 0 && d[j - 1].text == "::") || op == "=") return;
        add(s.path, is_ident(op) ? "operator " + op : "operator" + op, "function", d[j].line);
        return;
      }
      if (t == "=" || t == "[" || t == "{}") {
        // A variable: the identifier before the initialiser or the bounds.
        if (j > k && is_ident(d[j - 1].text) && !(j >= 2 && d[j - 2].text == "::"))
          add(s.path, d[j - 1].text, s.in_class ? "member" : "constant", d[j - 1].line);
        return;
      }
      if (t == "(") {
        if (j == k || !is_ident(d[j - 1].text)) return;  // "void (*f)(...)": not ours
        const std::string& fn = d[j - 1].text;
        if (j >= 2 && (d[j - 2].text == "::" || d[j - 2].text == "~")) return;  // out-of-line, destructor
        if (s.in_class && fn == s.class_name) return;                             // constructor
        add(s.path, fn, "function", d[j - 1].line);
        return;
      }
    }
    if (has_body) return;
    // A variable without initialiser: its name is the last identifier.
    if (d.size() > k && is_ident(d.back().text))
      add(s.path, d.back().text, s.in_class ? "member" : "constant", d.back().line);
  }

  // Parses declarations from toks_[i] until the "}" that closes this block
  // (or the end), which it consumes.
  void block(std::size_t& i, Scope s) {
    std::vector<Token> decl;
    int paren = 0;
    while (i < toks_.size()) {
      const Token& tok = toks_[i];
      const std::string& t = tok.text;
      if (decl.empty() && s.in_class && (t == "public" || t == "private" || t == "protected") &&
          i + 1 < toks_.size() && toks_[i + 1].text == ":") {
        s.is_public = t == "public";
        i += 2;
        continue;
      }
      const bool visible = !s.hidden && (!s.in_class || s.is_public);
      if (t == "(" || t == "[") ++paren;
      if (t == ")" || t == "]") --paren;
      if (t == "}") {
        ++i;
        return;
      }
      if (t == ";" && paren == 0) {
        if (visible) {
          std::vector<Token> d = strip_prefix(decl);
          std::string key, name;
          bool fwd = false;
          if (class_head(d, key, name, fwd)) {
            if (fwd && !name.empty()) add(s.path, name, s.in_class ? "member" : "type", d[0].line, true);
          } else {
            declaration(decl, s, false);
          }
        }
        decl.clear();
        ++i;
        continue;
      }
      if (t != "{") {
        decl.push_back(tok);
        ++i;
        continue;
      }
      // A "{": inside parentheses, an initialiser, a namespace, a class or
      // enum body, or a function body.
      if (paren > 0) {
        skip_braces(i);
        decl.push_back({"{}", tok.line});
        continue;
      }
      std::vector<Token> d = strip_prefix(decl);
      if (!d.empty() && d[0].text == "namespace") {
        Scope inner;
        const std::string ns = d.size() > 1 && is_ident(d[1].text) ? d[1].text : "";
        inner.path = ns.empty() ? s.path : join(s.path, ns);
        // "lemsg" is the top: its names are unqualified.
        if (ns == "lemsg") inner.path = "";
        inner.hidden = s.hidden || ns.empty() || ns == "detail";
        ++i;
        block(i, inner);
        decl.clear();
        continue;
      }
      std::string key, name;
      bool fwd = false;
      if (class_head(d, key, name, fwd)) {
        const std::string path = join(s.path, name);
        if (key == "enum") {
          if (visible) {
            if (!name.empty()) add(s.path, name, s.in_class ? "member" : "type", d[0].line);
            enumerators(i, name.empty() ? s.path : path);
          }
          skip_braces(i);
        } else {
          if (visible && !name.empty()) add(s.path, name, s.in_class ? "member" : "type", d[0].line);
          Scope inner;
          inner.path = path;
          inner.class_name = name;
          inner.hidden = !visible || name.empty();
          inner.in_class = true;
          inner.is_public = key != "class";
          ++i;
          block(i, inner);
        }
        // What follows the "}" ("};") ends an empty declaration.
        decl.clear();
        continue;
      }
      // Only what is outside parentheses counts: "f(int x = 0) {" is a body.
      bool assigns = false, calls = false;
      int depth = 0;
      for (std::size_t j = 0; j < d.size(); ++j) {
        const std::string& dt = d[j].text;
        if (depth == 0 && dt == "=" && !(j > 0 && d[j - 1].text == "operator")) assigns = true;
        if (depth == 0 && dt == "(") calls = true;
        if (dt == "(" || dt == "[") ++depth;
        if (dt == ")" || dt == "]") --depth;
      }
      const bool init = assigns || (!calls && !d.empty() && (is_ident(d.back().text) || d.back().text == ">"));
      if (init) {
        skip_braces(i);
        decl.push_back({"{}", tok.line});
        continue;
      }
      if (visible) declaration(decl, s, true);
      skip_braces(i);
      decl.clear();
    }
  }

  const std::vector<Token>& toks_;
  const std::vector<std::string>& sections_;
  std::vector<bool> forward_;  // per name: seen only in a forward declaration so far
};

// Macros and environment variables, from the header's lines.
void line_names(const std::vector<std::string>& lines, const std::vector<std::string>& sections,
                std::vector<Name>& out) {
  auto macro_name = [](const std::string& rest) {
    std::size_t e = 0;
    while (e < rest.size() && is_ident_char(rest[e])) ++e;
    return rest.substr(0, e);
  };
  // LEMSG_LOG is a macro and an environment variable: two names.
  auto add = [&](const std::string& scope, const std::string& name, const char* kind, std::size_t line) {
    for (const Name& n : out)
      if (n.scope == scope && n.name == name && n.kind == kind) return;
    Name n;
    n.scope = scope;
    n.name = name;
    n.kind = kind;
    n.section = sections[line];
    n.line = static_cast<int>(line) + 1;
    out.push_back(n);
  };
  for (std::size_t i = 0; i < lines.size(); ++i) {
    const std::string l = trim(lines[i]);
    if (starts_with(l, "#ifndef LEMSG_") && i + 1 < lines.size()) {
      const std::string name = macro_name(l.substr(8));
      if (starts_with(trim(lines[i + 1]), ("#define " + name).c_str()) && name != "LEMSG_HPP")
        add("", name, "macro", i + 1);
    } else if (starts_with(l, "#define LEMSG_")) {
      const std::string name = macro_name(l.substr(8));
      if (name != "LEMSG_HPP" && !starts_with(name, "LEMSG_DETAIL_")) add("", name, "macro", i);
    }
    for (std::size_t at = lines[i].find("getenv(\"LEMSG_"); at != std::string::npos;
         at = lines[i].find("getenv(\"LEMSG_", at + 1))
      add("", macro_name(lines[i].substr(at + 8)), "env", i);
  }
  // Result's enumerators: the X(Name, "text") lines of its X-macro list.
  bool in_list = false;
  for (std::size_t i = 0; i < lines.size(); ++i) {
    const std::string l = trim(lines[i]);
    if (starts_with(l, "#define LEMSG_DETAIL_RESULTS(")) {
      in_list = true;
      continue;
    }
    if (!in_list) continue;
    if (starts_with(l, "X(")) add("Result", macro_name(l.substr(2)), "enumerator", i);
    if (l.empty() || l[l.size() - 1] != '\\') in_list = false;
  }
}

std::vector<Name> extract(const std::string& header) {
  const std::vector<std::string> lines = split_lines(header);
  const std::vector<std::string> sections = section_of_lines(lines);
  const std::vector<Token> toks = tokenize(blank_non_code(header));
  Extractor ex(toks, sections);
  ex.run();
  std::vector<Name> names = ex.names;
  line_names(lines, sections, names);
  return names;
}

// ---- the reference

struct Span {
  std::string text;
  std::string tag;                    // the `## ` section's header tag ("" for none)
  std::vector<std::string> subjects;  // of the headings above it (and its own)
  int line;
};

// The code spans of `s`, in order.
std::vector<std::string> code_spans(const std::string& s) {
  std::vector<std::string> spans;
  std::size_t i = 0;
  while ((i = s.find('`', i)) != std::string::npos) {
    std::size_t ticks = 0;
    while (i + ticks < s.size() && s[i + ticks] == '`') ++ticks;
    const std::string fence(ticks, '`');
    const std::size_t end = s.find(fence, i + ticks);
    if (end == std::string::npos) break;
    spans.push_back(trim(s.substr(i + ticks, end - i - ticks)));
    i = end + ticks;
  }
  return spans;
}

// What a heading's code span is about: "RefMap" for "RefMap<T, N>".
std::string subject_of(std::string s) {
  static const char* const prefixes[] = {"namespace ", "enum class ", "enum ", "class ", "struct ", "lemsg::"};
  for (bool again = true; again;) {
    again = false;
    for (const char* p : prefixes)
      if (starts_with(s, p)) {
        s = s.substr(std::strlen(p));
        again = true;
      }
  }
  std::size_t e = 0;
  while (e < s.size() && (is_ident_char(s[e]) || (s[e] == ':' && e + 1 < s.size() && s[e + 1] == ':') ||
                          (s[e] == ':' && e > 0 && s[e - 1] == ':')))
    ++e;
  return s.substr(0, e);
}

std::vector<Span> entry_spans(const std::string& doc) {
  const std::vector<std::string> lines = split_lines(doc);
  std::vector<Span> out;
  std::vector<std::pair<int, std::string>> headings;  // level, subject
  std::string tag;
  bool fenced = false;
  for (std::size_t n = 0; n < lines.size(); ++n) {
    const std::string l = trim(lines[n]);
    if (starts_with(l, "```")) {
      fenced = !fenced;
      continue;
    }
    if (fenced) continue;
    std::vector<std::string> spans;
    if (!l.empty() && l[0] == '#') {
      int level = 0;
      while (level < static_cast<int>(l.size()) && l[level] == '#') ++level;
      while (!headings.empty() && headings.back().first >= level) headings.pop_back();
      std::string subject;
      const std::vector<std::string> all = code_spans(l);
      if (level <= 2) tag.clear();
      for (const std::string& sp : all) {
        if (starts_with(sp, ">>")) {
          if (level <= 2) tag = sp.substr(2);
        } else if (subject.empty()) {
          subject = subject_of(sp);
        }
        if (!starts_with(sp, ">>")) spans.push_back(sp);
      }
      headings.push_back({level, subject});
    } else if (!l.empty() && l[0] == '|') {
      const std::size_t end = l.find('|', 1);
      spans = code_spans(l.substr(1, end == std::string::npos ? std::string::npos : end - 1));
    } else {
      // A list item: "- ", "* " or "1. ", then its leading code spans.
      std::size_t k = 0;
      if (starts_with(l, "- ") || starts_with(l, "* ")) {
        k = 2;
      } else {
        while (k < l.size() && l[k] >= '0' && l[k] <= '9') ++k;
        k = (k > 0 && starts_with(l.substr(k), ". ")) ? k + 2 : 0;
      }
      if (k == 0) continue;
      for (;;) {
        while (k < l.size() && (l[k] == ' ' || l[k] == ',' || l[k] == '/')) ++k;
        if (k >= l.size() || l[k] != '`') break;
        std::size_t ticks = 0;
        while (k + ticks < l.size() && l[k + ticks] == '`') ++ticks;
        const std::size_t end = l.find(std::string(ticks, '`'), k + ticks);
        if (end == std::string::npos) break;
        spans.push_back(trim(l.substr(k + ticks, end - k - ticks)));
        k = end + ticks;
      }
    }
    for (const std::string& sp : spans) {
      Span e;
      e.text = sp;
      e.tag = tag;
      for (const auto& h : headings)
        if (!h.second.empty()) e.subjects.push_back(h.second);
      e.line = static_cast<int>(n) + 1;
      out.push_back(e);
    }
  }
  return out;
}

// Whether `word` occurs in `s` as a whole word (not inside a longer
// identifier); with `call`, only when `(` or `<` follows it.
bool has_word(const std::string& s, const std::string& word, bool call) {
  for (std::size_t at = s.find(word); at != std::string::npos; at = s.find(word, at + 1)) {
    const std::size_t end = at + word.size();
    if (at > 0 && is_ident_char(s[at - 1]) && is_ident_char(word[0])) continue;
    if (end < s.size() && is_ident_char(s[end]) && is_ident_char(word[word.size() - 1])) continue;
    if (!call) return true;
    std::size_t k = end;
    while (k < s.size() && s[k] == ' ') ++k;
    if (k < s.size() && (s[k] == '(' || s[k] == '<')) return true;
  }
  return false;
}

std::string without_spaces(const std::string& s) {
  std::string out;
  for (char c : s)
    if (c != ' ') out += c;
  return out;
}

// The suffixes of a scope, longest first: "wire::FrameType", "FrameType".
std::vector<std::string> scope_suffixes(const std::string& scope) {
  std::vector<std::string> out;
  if (scope.empty()) return out;
  out.push_back(scope);
  for (std::size_t at = scope.find("::"); at != std::string::npos; at = scope.find("::", at + 2))
    out.push_back(scope.substr(at + 2));
  return out;
}

bool has_entry(const Name& n, const std::vector<Span>& spans) {
  const bool is_operator = starts_with(n.name, "operator");
  const bool call = n.kind == "function";
  const std::vector<std::string> scopes = scope_suffixes(n.scope);
  for (const Span& sp : spans) {
    if (n.kind != "env" && sp.tag != n.section) continue;
    // Qualified: "Service::advertise", "Kind::Service".
    bool qualified = false;
    for (const std::string& s : scopes) {
      if (is_operator ? without_spaces(sp.text).find(without_spaces(s + "::" + n.name)) != std::string::npos
                      : has_word(sp.text, s + "::" + n.name, false))
        qualified = true;
    }
    if (qualified) return true;
    bool named;
    if (is_operator) {
      // "operator bool", "operator==": spaces do not matter, but a word
      // operator must end there ("operator bool", not "operator boolean").
      const std::string text = without_spaces(sp.text);
      const std::string want = without_spaces(n.name);
      const std::size_t at = text.find(want);
      named = at != std::string::npos &&
              !(is_ident_char(want[want.size() - 1]) && at + want.size() < text.size() &&
                is_ident_char(text[at + want.size()]));
    } else {
      named = has_word(sp.text, n.name, call);
    }
    if (!named) continue;
    if (scopes.empty()) return true;
    for (const std::string& subject : sp.subjects)
      for (const std::string& s : scopes)
        if (subject == s) return true;
  }
  return false;
}

std::string source_dir() { return LEMSG_TEST_SOURCE_DIR; }

std::string doc_path() {
  const char* p = std::getenv("LEMSG_API_DOC");
  return (p && *p) ? std::string(p) : source_dir() + "/docs/API.md";
}

}  // namespace reference_test

TEST_SUITE("reference") {
  TEST_CASE("reference: the header's public API is found (a sane count of each kind of name)") {
    using namespace reference_test;
    std::string header;
    REQUIRE_MESSAGE(read_file(source_dir() + "/lemsg.hpp", header), "cannot read " << source_dir() << "/lemsg.hpp");
    const std::vector<Name> names = extract(header);
    std::map<std::string, int> per_kind;
    std::map<std::string, int> per_section;
    for (const Name& n : names) {
      ++per_kind[n.kind];
      ++per_section[n.section];
    }
    std::string kinds, sections;
    for (const auto& k : per_kind) kinds += " " + k.first + " " + std::to_string(k.second);
    for (const auto& s : per_section) sections += " " + s.first + " " + std::to_string(s.second);
    MESSAGE("lemsg.hpp: " << names.size() << " public names;" << kinds << "; by section:" << sections);
    if (const char* dump = std::getenv("LEMSG_REFERENCE_DUMP")) {
      if (*dump && std::strcmp(dump, "0") != 0)
        for (const Name& n : names)
          std::printf("%-9s %-10s lemsg.hpp:%-5d %s\n", n.kind.c_str(), n.section.c_str(), n.line,
                      n.qualified().c_str());
    }
    // An extractor that lost its way finds far fewer names, or misses these.
    CHECK(per_kind["function"] >= 150);
    CHECK(per_kind["type"] >= 50);
    CHECK(per_kind["macro"] >= 30);
    CHECK(per_kind["enumerator"] >= 40);
    CHECK(per_kind["member"] >= 50);
    static const char* const known[] = {
        "Service::advertise",  "Session::request_sync", "Loop::run_once",  "Message::operator bool",
        "RefMap::release_owner", "TypedClient::call_async", "Directory::start", "wire::decode",
        "wire::Header::length", "ServiceOptions::stall_timeout_ms", "Result::BadReference", "LEMSG_MAX_SESSIONS",
        "LEMSG_CALLABLE_SIZE",  "LEMSG_VERSION_STR",    "LEMSG_RUNTIME_DIR", "InterfaceInfo::max_payload",
        "max_encoded_size",    "directory_connect",     "to_string"};
    for (const char* k : known) {
      bool found = false;
      for (const Name& n : names) found = found || n.qualified() == k;
      CHECK_MESSAGE(found, "the extractor did not find " << std::string(k));
    }
    // Nothing private or from lemsg::detail.
    for (const Name& n : names) {
      CHECK_MESSAGE(n.scope.find("detail") == std::string::npos, n.qualified());
      CHECK_MESSAGE(n.name[n.name.size() - 1] != '_', "a private member's name: " << n.qualified());
    }
  }

  TEST_CASE("reference: every public function, type, member and macro of lemsg.hpp has an entry in docs/API.md") {
    using namespace reference_test;
    std::string header, doc;
    REQUIRE_MESSAGE(read_file(source_dir() + "/lemsg.hpp", header), "cannot read " << source_dir() << "/lemsg.hpp");
    REQUIRE_MESSAGE(read_file(doc_path(), doc), "cannot read " << doc_path());
    const std::vector<Name> names = extract(header);
    const std::vector<Span> spans = entry_spans(doc);
    REQUIRE(!names.empty());
    REQUIRE(!spans.empty());
    std::size_t missing = 0;
    for (const Name& n : names) {
      if (has_entry(n, spans)) continue;
      ++missing;
      FAIL_CHECK("no entry in " << doc_path() << " for " << n.kind << " " << n.qualified() << " (lemsg.hpp:"
                                    << n.line << ", section >>" << n.section << ")");
    }
    MESSAGE((names.size() - missing) << " of " << names.size() << " public names have an entry in " << doc_path()
                                   << " (" << spans.size() << " entry spans)");
  }
}
