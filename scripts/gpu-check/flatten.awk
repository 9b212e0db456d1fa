# Flattens a JSON document into one `path=value` line per scalar, so shell scripts can read
# `dlaunch topo --json` and summary.json with grep and sed on nodes without jq or Python:
#   {"gpus":[{"id":"0","numa":1}]}   gives   gpus.0.id=0  and  gpus.0.numa=1
# String values lose their quotes; of their escapes only \" and \\ are undone (enough for
# ids, names, paths and UUIDs). Empty arrays and objects print nothing.

function path(    p, d, segment) {
    p = ""
    for (d = 1; d <= depth; d++) {
        segment = (kind[d] == "a") ? index_at[d] : key[d]
        p = (d == 1) ? segment : p "." segment
    }
    return p
}

function emit(value) {
    print path() "=" value
}

{ text = text $0 "\n" }

END {
    n = length(text)
    depth = 0
    i = 1
    while (i <= n) {
        c = substr(text, i, 1)
        if (c == "{" || c == "[") {
            depth++
            kind[depth] = (c == "{") ? "o" : "a"
            index_at[depth] = 0
            expecting_key[depth] = 1
            i++
        } else if (c == "}" || c == "]") {
            depth--
            i++
        } else if (c == ",") {
            if (kind[depth] == "a") index_at[depth]++
            else expecting_key[depth] = 1
            i++
        } else if (c == ":") {
            expecting_key[depth] = 0
            i++
        } else if (c == "\"") {
            j = i + 1
            while (j <= n && substr(text, j, 1) != "\"") j += (substr(text, j, 1) == "\\") ? 2 : 1
            s = substr(text, i + 1, j - i - 1)
            gsub(/\\"/, "\"", s)
            gsub(/\\\\/, "\\", s)
            if (kind[depth] == "o" && expecting_key[depth]) key[depth] = s
            else emit(s)
            i = j + 1
        } else if (c == " " || c == "\t" || c == "\n" || c == "\r") {
            i++
        } else {
            rest = substr(text, i)
            match(rest, /^[^],} \t\r\n]+/)
            emit(substr(rest, 1, RLENGTH))
            i += RLENGTH
        }
    }
}
