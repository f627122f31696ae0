# messy.kt: a valid file written carelessly, to pin what the parser and formatter make of it:
# declarations out of order, odd spacing, one-line blocks, values over several lines,
# and comments in every place a comment can go.

node   student:resnet20[target]   # trailing comment on a node
label->student:through
node peer : resnet20
edges * -> * : correct kl(T=4)   # bulk edges; the explicit ones below override their pairs
peer ->   student :   linear   kl( T = 2 ,weight=0.5 )

data digits {  val_split = 300   augment = pad_crop  pad = 1 }  # comment after a one-line block

train {
  # leading comment inside a block
  optimizer = sgd(lr = 0.05,
                  momentum = 0.9)   # a call over two lines
  schedule = step(milestones = [2,
    4], gamma=0.5)
  epochs=6
  # comment before the closing brace
}   # comment after the closing brace
graph messy   # the graph declaration, written last

# a comment at the end of the file
