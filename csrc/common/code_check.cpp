// The check of a TorchScript archive's source (archive_check.h: check_torchscript_source).
//
// libtorch 1.13's importer reads the statements of a class body through unchecked optional fields:
// `assign.type().get()` on an assignment without a type annotation, `assign.rhs().get()` on one
// without a value. On a crafted file (fuzz_torchscript: `__pardmeters__ = ["weight", ]`, a misspelt
// name the importer takes for a class constant) that reads past an empty vector and crashes. Which
// field each kind of class reads (torch/csrc/jit/serialization/import_source.cpp, 1.13):
//  - a Module or plain class: `__parameters__`, `__buffers__` and the hook lists read the value; any
//    other name with a value is a constant (reads the type: `name : Final[T] = value`); a name with
//    only a type is an attribute; `__annotations__["name"] = T` reads the value;
//  - a NamedTuple: every field reads the type;
//  - an Enum: every member reads the value.
// Every other malformed statement makes libtorch throw, so the check only needs to find class-body
// assignments and which of the two fields they have. A file is parsed whole before any of its
// classes is imported, so only syntactically valid files reach the importer: the scan follows the
// lexer's rules for valid code (strings, comments, brackets, indentation) and need not judge the rest.

#include <cctype>
#include <string>
#include <string_view>
#include <vector>

#include "common/archive_check.h"
#include "common/error.h"

namespace gradq {

namespace {

// One statement of the source: its text with comments removed, string literals replaced by "" and
// line breaks inside brackets by spaces; `indent` is its line's leading whitespace (the lexer counts
// every blank character as one).
struct Statement {
  int64_t line = 0;
  int64_t indent = 0;
  std::string text;
};

std::vector<Statement> statements_of(std::string_view code) {
  std::vector<Statement> out;
  Statement current;
  int64_t line = 1, indent = 0, depth = 0;
  bool line_start = true;
  auto finish = [&] {
    if (!current.text.empty()) out.push_back(std::move(current));
    current = Statement{};
  };
  auto append = [&](std::string_view s) {
    if (current.text.empty()) {
      current.line = line;
      current.indent = indent;
    }
    current.text += s;
  };
  const size_t n = code.size();
  size_t i = 0;
  while (i < n) {
    const char c = code[i];
    if (line_start) {
      indent = 0;
      while (i < n && code[i] != '\n' && std::isspace(static_cast<unsigned char>(code[i]))) ++indent, ++i;
      line_start = false;
      continue;
    }
    if (c == '\n') {
      ++line, ++i;
      if (depth > 0) {
        current.text += ' ';
      } else {
        finish();
        line_start = true;
      }
    } else if (std::isspace(static_cast<unsigned char>(c))) {
      if (!current.text.empty()) current.text += ' ';
      ++i;
    } else if (c == '#') {
      while (i < n && code[i] != '\n') ++i;
    } else if (c == '\\' && i + 1 < n && code[i + 1] == '\n') {
      current.text += ' ';
      ++line, i += 2;
    } else if (c == '\'' || c == '"') {
      const bool triple = i + 2 < n && code[i + 1] == c && code[i + 2] == c;
      append("\"\"");
      i += triple ? 3 : 1;
      while (i < n) {
        if (code[i] == '\\' && i + 1 < n) {
          if (code[i + 1] == '\n') ++line;
          i += 2;
        } else if (code[i] == c && (!triple || (i + 2 < n && code[i + 1] == c && code[i + 2] == c))) {
          i += triple ? 3 : 1;
          break;
        } else if (code[i] == '\n' && !triple) {
          break;  // not valid code: the lexer throws
        } else {
          if (code[i] == '\n') ++line;
          ++i;
        }
      }
    } else if (c == ';' && depth == 0) {
      finish();
      ++i;
    } else {
      if (c == '(' || c == '[' || c == '{') ++depth;
      if ((c == ')' || c == ']' || c == '}') && depth > 0) --depth;
      append(std::string_view(&c, 1));
      ++i;
    }
  }
  finish();
  return out;
}

bool is_identifier(std::string_view s) {
  if (s.empty() || !(std::isalpha(static_cast<unsigned char>(s[0])) || s[0] == '_')) return false;
  for (char c : s)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_')) return false;
  return true;
}

std::string_view trimmed(std::string_view s) {
  while (!s.empty() && s.front() == ' ') s.remove_prefix(1);
  while (!s.empty() && s.back() == ' ') s.remove_suffix(1);
  return s;
}

bool starts_with_word(std::string_view s, std::string_view word) {
  return s.substr(0, word.size()) == word &&
         (s.size() == word.size() || !(std::isalnum(static_cast<unsigned char>(s[word.size()])) || s[word.size()] == '_'));
}

// An assignment's parts, found at bracket depth 0: `lhs [: type] [= value]`.
struct Assignment {
  std::string_view lhs;
  bool has_type = false;
  bool has_value = false;
};

// The statement as an assignment, or one with an empty lhs when it is none (a def, an expression,
// an augmented assignment, a comparison).
Assignment assignment_of(std::string_view text) {
  size_t colon = std::string_view::npos, equals = std::string_view::npos;
  int64_t depth = 0;
  for (size_t i = 0; i < text.size() && equals == std::string_view::npos; ++i) {
    const char c = text[i];
    if (c == '(' || c == '[' || c == '{') ++depth;
    if (c == ')' || c == ']' || c == '}') --depth;
    if (depth != 0) continue;
    if (c == ':' && colon == std::string_view::npos) colon = i;
    const bool operator_before = i > 0 && std::string_view("=!<>+-*/%&|^@:~").find(text[i - 1]) != std::string_view::npos;
    const bool equals_after = i + 1 < text.size() && text[i + 1] == '=';
    if (c == '=' && !operator_before && !equals_after) equals = i;
    if (c == '=' && equals_after) ++i;  // `==`
  }
  Assignment a;
  a.has_type = colon != std::string_view::npos;
  a.has_value = equals != std::string_view::npos;
  if (!a.has_type && !a.has_value) return a;
  a.lhs = trimmed(text.substr(0, a.has_type ? colon : equals));
  return a;
}

bool reads_value(std::string_view name) {
  return name == "__parameters__" || name == "__buffers__" || name == "__forward_pre_hooks__" ||
         name == "__forward_hooks__";
}

}  // namespace

void check_torchscript_source(std::string_view code, const std::string& what) {
  const std::vector<Statement> statements = statements_of(code);
  for (size_t s = 0; s < statements.size(); ++s) {
    const Statement& header = statements[s];
    if (header.indent != 0 || !starts_with_word(header.text, "class")) continue;
    // `class Name(Base):` -> Base; no parentheses: a plain class.
    std::string_view base;
    const size_t open = header.text.find('('), close = header.text.rfind(')');
    if (open != std::string::npos && close != std::string::npos && close > open)
      base = trimmed(std::string_view(header.text).substr(open + 1, close - open - 1));
    if (base == "Interface" || base == "ModuleInterface") continue;  // methods only, checked by libtorch
    const std::string_view name_and_rest = std::string_view(header.text).substr(5);
    const std::string class_name(trimmed(name_and_rest.substr(0, name_and_rest.find_first_of("(:"))));
    int64_t body_indent = -1;
    for (size_t t = s + 1; t < statements.size() && statements[t].indent > 0; ++t) {
      const Statement& st = statements[t];
      if (body_indent < 0) body_indent = st.indent;
      if (st.indent != body_indent || starts_with_word(st.text, "def") || st.text[0] == '@') continue;
      const Assignment a = assignment_of(st.text);
      if (a.lhs.empty()) continue;
      const bool is_name = is_identifier(a.lhs);
      const bool is_subscript = !is_name && a.lhs.back() == ']';
      std::string expected;
      if (base == "Enum") {
        if (!a.has_value) expected = "a value (`name = value`)";
      } else if (base == "NamedTuple") {
        if (is_name && !a.has_type) expected = "a type (`name : T`)";
      } else if (is_subscript || (is_name && reads_value(a.lhs))) {
        if (!a.has_value) expected = "a value";
      } else if (is_name && a.lhs != "__annotations__" && a.has_value && !a.has_type) {
        expected = "a type (`name : Final[T] = value`)";
      }
      if (!expected.empty())
        throw Error(fmt::format(
            "{} is corrupt: line {} declares '{}' in class {} without {}, which libtorch 1.13's importer reads unchecked",
            what, st.line, std::string(a.lhs).substr(0, 64), class_name.substr(0, 64), expected));
    }
  }
}

}  // namespace gradq
